"""Enhanced backbones: any Detectron2 backbone carrying the Feature Enhancement regulariser.

An "enhanced" backbone is the plain one (same class, forward, ``output_shape``, state-dict keys and
parameters) plus a parameter-free :class:`~afigan.layers.FeatureEnhancementRegularizer` attached
to it, which names ResNet stages of its bottom-up network (``res3`` sharp, ``res5`` smooth by
default). The regulariser reads the stages' current weights whenever :func:`fe_losses` is called;
the model wrapper in :mod:`afigan.modeling.feature_enhancement.meta_arch` does that in every training
forward and puts the terms into the loss dict.

Registered builders (each = its plain counterpart + the regulariser from ``MODEL.FE``):

=====================================  ==============================================
``build_fe_resnet_fpn_backbone``        Detectron2 ``build_resnet_fpn_backbone``
``build_fe_retinanet_resnet_fpn_backbone``  ``build_retinanet_resnet_fpn_backbone`` (P6/P7)
``build_fe_resnet_fpn_sr_backbone``     afigan FPN with ``MODEL.AFI.INTERP`` upsampler
``build_fe_resnet_pafpn_sr_backbone``   afigan PAFPN
``build_fe_resnet_bifpn_sr_backbone``   afigan BiFPN (looked up when called)
``build_fe_backbone``                   any builder named by ``MODEL.FE.BASE_BACKBONE``
=====================================  ==============================================
"""

import logging
from typing import Dict, Iterable, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from torch import nn

from afigan.layers.fe_regularizers import FeatureEnhancementRegularizer

__all__ = [
    "fe_regularizer_from_config",
    "find_stage_root",
    "attach_feature_enhancement",
    "has_feature_enhancement",
    "fe_regularizer",
    "fe_root",
    "fe_losses",
    "build_fe_backbone",
    "build_fe_resnet_fpn_backbone",
    "build_fe_retinanet_resnet_fpn_backbone",
    "build_fe_resnet_fpn_sr_backbone",
    "build_fe_resnet_pafpn_sr_backbone",
    "build_fe_resnet_bifpn_sr_backbone",
]

logger = logging.getLogger(__name__)


def fe_regularizer_from_config(cfg) -> FeatureEnhancementRegularizer:
    """The regulariser described by ``cfg.MODEL.FE`` (keys: :func:`afigan.config.add_fe_config`)."""
    if "FE" not in cfg.MODEL:
        raise KeyError("cfg has no MODEL.FE node; call afigan.add_afigan_config(cfg) before merging FE configs.")
    fe = cfg.MODEL.FE
    try:
        return FeatureEnhancementRegularizer(
            sharp_stages=fe.SHARP_STAGES,
            smooth_stages=fe.SMOOTH_STAGES,
            sharp_weight=fe.SHARP_WEIGHT,
            smooth_weight=fe.SMOOTH_WEIGHT,
            params=fe.PARAMS,
            smooth_norm=fe.SMOOTH_NORM,
            var_unbiased=fe.VAR_UNBIASED,
            reduction=fe.REDUCTION,
        )
    except ValueError as e:
        raise ValueError(f"MODEL.FE: {e}") from None


def _resolves(module: nn.Module, names: Iterable[str]) -> bool:
    try:
        for n in names:
            module.get_submodule(n)
    except AttributeError:
        return False
    return True


def find_stage_root(backbone: nn.Module, stages: Iterable[str]) -> str:
    """Path (``""``, ``"bottom_up"``, ``"bottom_up.bottom_up"``, ...) of the first module in the
    backbone's ``bottom_up`` chain that has every named stage as a sub-module."""
    stages = list(stages)
    path, module = "", backbone
    while True:
        if _resolves(module, stages):
            return path
        nxt = getattr(module, "bottom_up", None)
        if not isinstance(nxt, nn.Module):
            break
        path, module = (f"{path}.bottom_up" if path else "bottom_up"), nxt
    children = [n for n, _ in module.named_children()]
    raise KeyError(
        f"FE stages {stages} are not all sub-modules of {type(backbone).__name__} or its bottom_up network "
        f"(whose children are {children}); set MODEL.FE.SHARP_STAGES / SMOOTH_STAGES to stages that exist "
        f"(a ResNet only builds stages up to the last one in MODEL.RESNETS.OUT_FEATURES)."
    )


def _require_host(backbone: nn.Module, inputs) -> None:
    # Forward pre-hook: an enhanced backbone training inside a model that never collects its
    # terms would silently be the baseline -- the reference's main bug. Stop instead.
    if backbone.training and torch.is_grad_enabled() and not getattr(backbone, "_fe_hosted", False):
        if backbone._fe_regularizer.active:
            raise RuntimeError(
                "This feature-enhanced backbone is training in a model that does not add its loss terms; set "
                "MODEL.META_ARCHITECTURE FeatureEnhanced with MODEL.FE.META_ARCHITECTURE <your detector>, or call "
                "afigan.modeling.enable_feature_enhancement(model)."
            )


def attach_feature_enhancement(backbone: nn.Module, regularizer: FeatureEnhancementRegularizer) -> nn.Module:
    """Make ``backbone`` (in place) an enhanced backbone and return it.

    Adds no parameters, buffers or sub-modules: the regulariser and the path of the module that
    holds its stages are plain attributes. Raises if a named stage does not exist; warns when a
    stage with a non-zero λ is frozen (its term is then a constant 0).
    """
    path = find_stage_root(backbone, tuple(regularizer.sharp_stages) + tuple(regularizer.smooth_stages))
    backbone._fe_regularizer = regularizer
    backbone._fe_root = path
    if not getattr(backbone, "_fe_guarded", False):
        backbone.register_forward_pre_hook(_require_host)
        backbone._fe_guarded = True
    root = backbone.get_submodule(path) if path else backbone
    for name in regularizer.frozen_stages(root):
        logger.warning(
            "Feature enhancement: stage %s has no trainable %s tensors (frozen, e.g. by "
            "MODEL.BACKBONE.FREEZE_AT); its term is a constant 0.",
            name,
            regularizer.params,
        )
    return backbone


def has_feature_enhancement(backbone: nn.Module) -> bool:
    """True when :func:`attach_feature_enhancement` was applied to ``backbone``."""
    return isinstance(getattr(backbone, "_fe_regularizer", None), FeatureEnhancementRegularizer)


def fe_regularizer(backbone: nn.Module) -> FeatureEnhancementRegularizer:
    """The regulariser :func:`attach_feature_enhancement` attached to ``backbone``."""
    if not has_feature_enhancement(backbone):
        raise ValueError(f"{type(backbone).__name__} carries no feature-enhancement regulariser.")
    return backbone._fe_regularizer


def fe_root(backbone: nn.Module) -> nn.Module:
    """The module whose children are the regulariser's stages (usually ``backbone.bottom_up``)."""
    return backbone.get_submodule(backbone._fe_root) if backbone._fe_root else backbone


def fe_losses(backbone: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(losses, stats)`` of the attached regulariser from the current weights (see
    :meth:`FeatureEnhancementRegularizer.compute`); two empty dicts for a plain backbone."""
    if not has_feature_enhancement(backbone):
        return {}, {}
    return fe_regularizer(backbone).compute(fe_root(backbone))


def _enhanced(cfg, input_shape: ShapeSpec, base: str) -> Backbone:
    try:
        builder = BACKBONE_REGISTRY.get(base)
    except KeyError:
        raise KeyError(
            f"Backbone builder {base!r} is not registered (import the module that defines it, "
            f"e.g. `import afigan`, or fix MODEL.FE.BASE_BACKBONE)."
        ) from None
    backbone = builder(cfg, input_shape)
    if cfg.MODEL.FE.ENABLED:
        attach_feature_enhancement(backbone, fe_regularizer_from_config(cfg))
    return backbone


@BACKBONE_REGISTRY.register()
def build_fe_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``MODEL.FE.BASE_BACKBONE`` (any registered builder) with the FE regulariser attached."""
    if cfg.MODEL.FE.BASE_BACKBONE == "build_fe_backbone":
        raise ValueError("MODEL.FE.BASE_BACKBONE must name a plain backbone builder, not build_fe_backbone itself.")
    return _enhanced(cfg, input_shape, cfg.MODEL.FE.BASE_BACKBONE)


@BACKBONE_REGISTRY.register()
def build_fe_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN (P2-P6) with the FE regulariser attached."""
    return _enhanced(cfg, input_shape, "build_resnet_fpn_backbone")


@BACKBONE_REGISTRY.register()
def build_fe_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's RetinaNet ResNet-FPN (P3-P7, P6 from C5) with the FE regulariser attached."""
    return _enhanced(cfg, input_shape, "build_retinanet_resnet_fpn_backbone")


@BACKBONE_REGISTRY.register()
def build_fe_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """afigan's FPN (upsampler ``MODEL.AFI.INTERP``, e.g. the AF interpolator) with FE attached."""
    return _enhanced(cfg, input_shape, "build_resnet_fpn_sr_backbone")


@BACKBONE_REGISTRY.register()
def build_fe_resnet_pafpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """afigan's PAFPN (upsampler ``MODEL.AFI.INTERP``) with FE attached."""
    return _enhanced(cfg, input_shape, "build_resnet_pafpn_sr_backbone")


@BACKBONE_REGISTRY.register()
def build_fe_resnet_bifpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """afigan's BiFPN (upsampler ``MODEL.AFI.INTERP``) with FE attached."""
    return _enhanced(cfg, input_shape, "build_resnet_bifpn_sr_backbone")
