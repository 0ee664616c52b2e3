"""Feature Enhancement (the "enhanced backbone" weight regulariser) for any Detectron2 detector:
enhanced backbone builders (``backbones``) and the model wrapper that adds the terms to the loss
dict (``meta_arch``). The pure-PyTorch terms live in :mod:`afigan.layers.fe_regularizers`, the
``MODEL.FE.*`` keys in :mod:`afigan.config`. Importing this module registers the components."""

from .backbones import (
    attach_feature_enhancement,
    fe_losses,
    fe_regularizer,
    fe_regularizer_from_config,
    fe_root,
    find_stage_root,
    has_feature_enhancement,
)
from .meta_arch import FeatureEnhanced, FeatureEnhancementMixin, enable_feature_enhancement, fe_class, feature_enhanced

__all__ = [
    "attach_feature_enhancement",
    "fe_losses",
    "fe_regularizer",
    "fe_regularizer_from_config",
    "fe_root",
    "find_stage_root",
    "has_feature_enhancement",
    "FeatureEnhanced",
    "FeatureEnhancementMixin",
    "enable_feature_enhancement",
    "fe_class",
    "feature_enhanced",
]
