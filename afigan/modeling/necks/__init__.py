"""Necks with a pluggable, shared x2 upsampler (``srf_module``): FPN, PAFPN, BiFPN."""
from .common import freeze_, resolve_norm, upsampler_from_config
from .fpn import AFIFPN, build_resnet_fpn_sr_backbone
from .pafpn import AFIPAFPN, build_resnet_pafpn_sr_backbone
from .bifpn import AFIBiFPN, build_resnet_bifpn_sr_backbone, build_swint_bifpn_sr_backbone
