"""``add_fe_config(cfg)``: the ``MODEL.FE.*`` keys of the Feature Enhancement regulariser.

Called by :func:`afigan.add_afigan_config`; idempotent like it. Defaults are the reference's
(spec feature_enhancement.md §2.2 / §7.3). The keys are read only by the FE components (the
``FeatureEnhanced`` meta-architecture and the ``build_fe_*`` backbones), so adding them changes
no other model.
"""
from detectron2.config import CfgNode as CN

from .config_utils import node as _node
from .config_utils import set_default as _set_default

__all__ = ["add_fe_config"]


def add_fe_config(cfg: CN) -> CN:
    """Add ``MODEL.FE`` to ``cfg`` in place (keys already present are kept) and return it."""
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    fe = _node(cfg.MODEL, "FE")
    _set_default(fe, "ENABLED", True)  # master switch of the FE components; False = exact baseline
    _set_default(fe, "META_ARCHITECTURE", "GeneralizedRCNN")  # detector wrapped by META_ARCHITECTURE "FeatureEnhanced"
    _set_default(fe, "BASE_BACKBONE", "build_resnet_fpn_backbone")  # plain builder wrapped by "build_fe_backbone"
    _set_default(fe, "SHARP_STAGES", ["res3"])  # stages whose weight variance is maximised (torchvision layer2)
    _set_default(fe, "SMOOTH_STAGES", ["res5"])  # stages whose weight Frobenius norm is penalised (layer4)
    _set_default(fe, "SHARP_WEIGHT", 1e-5)  # lambda_e; reference: 1e-5 RetinaNet, 1.0 Faster R-CNN
    _set_default(fe, "SMOOTH_WEIGHT", 1e-5)  # lambda_s; reference: 1e-5
    _set_default(fe, "PARAMS", "conv_weight")  # tensors that count: "conv_weight" | "conv" (+ biases) | "all"
    _set_default(fe, "SMOOTH_NORM", "fro")  # "fro" (reference, unsquared) | "fro_sq" (weight-decay-like)
    _set_default(fe, "VAR_UNBIASED", True)  # n - 1 denominator of the variance (reference)
    _set_default(fe, "REDUCTION", "sum")  # over tensors: "sum" (reference) | "mean"
    if was_frozen:
        cfg.freeze()
    return cfg
