"""Meta-architectures and dense heads: FCOS (a registered proposal generator), OneStageDetector,
and the config keys of FCOS / CenterMask. Importing this module registers them."""
from .detector_config import add_centermask_config, add_detector_config, add_fcos_config
from .fcos import FCOS
from .fcos_head import FCOSScaledHead
from .num_classes import check_num_classes
from .one_stage import OneStageDetector
# Neck builders with P6/P7 for the dense heads live with the other necks; importing them here
# registers them even though afigan.modeling.necks' own __init__ is another module's business.
from ..necks import fpn_p6p7 as _fpn_p6p7  # noqa: F401
