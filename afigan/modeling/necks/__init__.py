"""Necks with a pluggable, shared x2 upsampler (``srf_module``): FPN, PAFPN, BiFPN, and every
registered bottom-up x neck builder (:mod:`.builders`)."""
from .common import freeze_, upsampler_from_config
from .fpn import AFIFPN
from .pafpn import AFIPAFPN
from .bifpn import AFIBiFPN
from .builders import *  # noqa: F401,F403  (registers the builders)
