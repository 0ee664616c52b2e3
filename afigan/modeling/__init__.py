"""Detectron2 components of afigan; importing this module registers them."""
from . import necks  # noqa: F401
from . import backbones  # noqa: F401
from .meta_arch import af_extractor, teacher  # noqa: F401  (stage 1-2 models)
from .convert import afi_fpn, use_af_interpolator  # noqa: F401
from .feature_enhancement import enable_feature_enhancement, feature_enhanced  # noqa: F401
from . import meta_arch, roi_heads  # noqa: F401  (FCOS, OneStageDetector, CenterMask heads)
