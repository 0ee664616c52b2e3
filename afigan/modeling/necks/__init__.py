"""Necks with a pluggable x2 upsampler (shared ``srf_module`` or per-step ``srf_modules``): FPN,
PAFPN, BiFPN, and every registered bottom-up x neck builder (:mod:`.builders`)."""

from .bifpn import AFIBiFPN
from .builders import *  # noqa: F401,F403  (registers the builders)
from .common import (
    freeze_,
    neck_upsampler_from_config,
    standalone_upsampler_from_config,
    upsample_step,
    upsampler_from_config,
    upsampler_options,
)
from .fpn import AFIFPN
from .pafpn import AFIPAFPN
