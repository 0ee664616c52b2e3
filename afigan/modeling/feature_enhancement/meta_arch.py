"""Adds the Feature Enhancement terms to the training loss dict of *any* meta-architecture.

The terms depend only on backbone weights, so nothing about them is head-specific: after the
detector's own training forward has produced its loss dict, ``loss_fe_smooth`` and
``loss_fe_sharp`` are computed from the current weights and added to it. They then follow the
normal Detectron2 path -- summed by the trainer, in the same backward pass as the detector loss
(never after it, unlike the reference), logged by the event storage, all-reduced under
DDP, untouched by AMP (computed in float32).

How the model gets this behaviour, without changing its state-dict keys or parameters:
:func:`enable_feature_enhancement` swaps the instance's class for a subclass made of
:class:`FeatureEnhancementMixin` and the original class (``GeneralizedRCNN`` -> ``FEGeneralizedRCNN``,
``RetinaNet`` -> ``FERetinaNet``, and likewise for FCOS, CenterMask, ...). Entry points:

* yacs: ``MODEL.META_ARCHITECTURE FeatureEnhanced`` with ``MODEL.FE.META_ARCHITECTURE <detector>``
  (two overrides switch FE on for an existing config);
* LazyConfig: ``model = L(feature_enhanced)(model=<detector>, sharp_weight=..., ...)``;
* Python: ``enable_feature_enhancement(model, regularizer)``.
"""

import logging
from typing import Dict, Optional

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from afigan.layers.fe_regularizers import FeatureEnhancementRegularizer

from .backbones import (
    attach_feature_enhancement,
    fe_losses,
    fe_regularizer,
    fe_regularizer_from_config,
    fe_root,
    has_feature_enhancement,
)

__all__ = ["FeatureEnhancementMixin", "fe_class", "enable_feature_enhancement", "feature_enhanced", "FeatureEnhanced"]

logger = logging.getLogger(__name__)

# Relative strength (|term gradient| / |weight-decay gradient|) below which the start-up log warns.
WEAK_STRENGTH = 0.01


class FeatureEnhancementMixin:
    """Mixin placed before a meta-architecture class: its training forward returns the parent's
    loss dict plus the FE terms of ``self.backbone``. Inference is the parent's, unchanged."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not self.training:
            return out
        losses, stats = fe_losses(self.backbone)
        if not losses:
            return out
        if not isinstance(out, dict):
            raise TypeError(
                f"{type(self).__name__} returned {type(out).__name__} in training, not a dict of losses, "
                f"so the feature-enhancement terms cannot be added to it."
            )
        clash = sorted(set(out) & set(losses))
        if clash:
            raise KeyError(
                f"The detector's loss dict already has {clash}; the feature-enhancement terms would overwrite it."
            )
        out.update(losses)
        _log_statistics(self, stats)
        return out


def _log_statistics(model: nn.Module, stats: Dict[str, torch.Tensor]) -> None:
    if not getattr(model, "_fe_reported", True):
        model._fe_reported = True
        _report_strength(model)
    try:
        storage = get_event_storage()
    except AssertionError:  # not inside a trainer's EventStorage
        return
    # Raw S and V (no "loss_" prefix, so the trainer does not sum them) go to metrics.json.
    storage.put_scalars(**{k: float(v) for k, v in stats.items()})


def _report_strength(model: nn.Module) -> None:
    # Logged at the first training step (after checkpoint loading), because the smooth term's
    # pull relative to weight decay depends on the loaded weights' norms.
    reg, root = fe_regularizer(model.backbone), fe_root(model.backbone)
    _, stats = reg.compute(root)
    logger.info(
        "Feature enhancement: %s; initial %s.", reg, ", ".join(f"{k} = {float(v):.6g}" for k, v in stats.items())
    )
    wd = getattr(model, "_fe_weight_decay", None)
    if not wd:
        return
    for key, (lo, hi) in reg.strength(root, wd).items():
        logger.info("Feature enhancement: %s pulls with %.3g-%.3g x the weight decay (%g) per tensor.", key, lo, hi, wd)
        if hi < WEAK_STRENGTH:
            logger.warning(
                "Feature enhancement: %s is below %g%% of the weight decay's effect on every tensor; "
                "at this lambda it barely changes training.",
                key,
                100 * WEAK_STRENGTH,
            )


_FE_CLASSES: Dict[type, type] = {}


def fe_class(cls: type) -> type:
    """The cached subclass ``FE<cls.__name__>`` of (:class:`FeatureEnhancementMixin`, ``cls``)."""
    if issubclass(cls, FeatureEnhancementMixin):
        return cls
    if cls not in _FE_CLASSES:
        name = "FE" + cls.__name__
        new = type(
            name,
            (FeatureEnhancementMixin, cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{cls.__name__} whose training loss dict also holds the feature-enhancement terms.",
            },
        )
        _FE_CLASSES[cls] = new
        globals().setdefault(name, new)  # module-level name, so instances can be pickled
    return _FE_CLASSES[cls]


def enable_feature_enhancement(
    model: nn.Module, regularizer: Optional[FeatureEnhancementRegularizer] = None, weight_decay: Optional[float] = None
) -> nn.Module:
    """Turn a built detector (in place) into its feature-enhanced version and return it.

    Args:
        model: any meta-architecture with a ``backbone`` attribute whose training forward returns
            a dict of losses.
        regularizer: attached to ``model.backbone`` (whose ``bottom_up`` chain must hold the
            named stages); ``None`` keeps the one an enhanced backbone already carries, or uses the
            reference defaults (res3 sharp, res5 smooth, λ = 1e-5) for a plain backbone.
        weight_decay: the optimizer's weight decay, used only to log how strong the terms are.

    State-dict keys, parameters and inference outputs stay those of ``model``.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `backbone` module, so there are no stages to regularise.")
    if regularizer is not None or not has_feature_enhancement(backbone):
        attach_feature_enhancement(backbone, regularizer or FeatureEnhancementRegularizer())
    model.__class__ = fe_class(type(model))
    backbone._fe_hosted = True
    model._fe_weight_decay = weight_decay
    model._fe_reported = False
    return model


def feature_enhanced(
    model: nn.Module,
    sharp_stages=("res3",),
    smooth_stages=("res5",),
    sharp_weight: float = 1e-5,
    smooth_weight: float = 1e-5,
    params: str = "conv_weight",
    smooth_norm: str = "fro",
    var_unbiased: bool = True,
    reduction: str = "sum",
    weight_decay: Optional[float] = None,
    enabled: bool = True,
) -> nn.Module:
    """LazyConfig-friendly form: ``L(feature_enhanced)(model=L(FCOS)(...), sharp_weight=1.0)``.

    ``enabled=False`` returns ``model`` untouched (the exact baseline)."""
    if not enabled:
        return model
    reg = FeatureEnhancementRegularizer(
        sharp_stages, smooth_stages, sharp_weight, smooth_weight, params, smooth_norm, var_unbiased, reduction
    )
    return enable_feature_enhancement(model, reg, weight_decay)


@META_ARCH_REGISTRY.register()
def FeatureEnhanced(cfg) -> nn.Module:  # noqa: N802 -- the registry key is this function's name
    """Builds ``MODEL.FE.META_ARCHITECTURE`` and, when ``MODEL.FE.ENABLED``, makes it feature-enhanced
    with the regulariser of ``MODEL.FE`` (an enhanced backbone's own regulariser is replaced by it,
    being built from the same keys)."""
    inner = cfg.MODEL.FE.META_ARCHITECTURE
    if inner == "FeatureEnhanced":
        raise ValueError(
            "MODEL.FE.META_ARCHITECTURE must name the detector to enhance (e.g. RetinaNet), not FeatureEnhanced."
        )
    try:
        build = META_ARCH_REGISTRY.get(inner)
    except KeyError:
        raise KeyError(f"MODEL.FE.META_ARCHITECTURE {inner!r} is not a registered meta-architecture.") from None
    # The detector is built from the config it would see without FE, so code that reads
    # MODEL.META_ARCHITECTURE while building (e.g. class-count checks) sees its own name.
    inner_cfg = cfg.clone()
    inner_cfg.defrost()
    inner_cfg.MODEL.META_ARCHITECTURE = inner
    if cfg.is_frozen():
        inner_cfg.freeze()
    model = build(inner_cfg)
    if not cfg.MODEL.FE.ENABLED:
        return model
    return enable_feature_enhancement(model, fe_regularizer_from_config(cfg), cfg.SOLVER.WEIGHT_DECAY)
