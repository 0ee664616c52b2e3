"""Detectron2 components of afigan; importing this module registers them."""

from . import (
    backbones,  # noqa: F401  (ResNeSt, Swin)
    fcos,  # noqa: F401  (FCOS, OneStageDetector)
    meta_arch,  # noqa: F401  (teacher, stage-2 AF extractor)
    necks,  # noqa: F401  (FPN, PAFPN, BiFPN and their builders)
    roi_heads,  # noqa: F401  (CenterMask heads)
)
from .convert import afi_fpn, use_af_interpolator  # noqa: F401
from .feature_enhancement import enable_feature_enhancement, feature_enhanced  # noqa: F401
