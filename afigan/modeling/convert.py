"""Plugging the AF interpolator (or any registered upsampler) into existing Detectron2 models
and LazyConfigs, without touching their other weights.

* :func:`use_af_interpolator` converts every stock ``detectron2.modeling.FPN`` inside an already
  built model into :class:`AFIFPN` in place (same modules, same weights, only the upsampling
  changes), optionally loading interpolator weights.
* :func:`afi_fpn` rewrites a LazyConfig node ``L(FPN)(...)`` into ``L(AFIFPN)(...)``.
"""

from typing import Any, List, Optional

from detectron2.modeling.backbone.fpn import FPN
from torch import nn

from afigan.checkpoint import load_interpolator_weights
from afigan.layers import build_upsampler

from .necks.fpn import AFIFPN

__all__ = ["use_af_interpolator", "afi_fpn"]


def use_af_interpolator(
    model: nn.Module, weights: Optional[str] = None, kind: str = "afi", freeze: bool = False, **upsampler_kwargs
) -> List[str]:
    """Make every stock Detectron2 FPN in ``model`` upsample with ``kind`` (default the AF
    interpolator). Every existing parameter and buffer is kept; the converted FPN gains one
    shared ``srf_module``, put on the device and dtype of the FPN's weights.

    Args:
        model: e.g. a ``GeneralizedRCNN`` built with ``build_resnet_fpn_backbone``.
        weights: optional checkpoint whose interpolator tensors are loaded (a stage-1 G file, a
            stage-2 checkpoint or a released detector).
        kind: an upsampler name of :func:`afigan.layers.build_upsampler`.
        freeze: set ``requires_grad=False`` on the interpolator.
        upsampler_kwargs: passed to the upsampler (e.g. ``num_blocks=3``).
    Returns: names of the converted modules (e.g. ``["backbone"]``). Raises ValueError when the
    model has no stock FPN.
    """
    converted = []
    for name, module in getattr(model, "module", model).named_modules():
        if type(module) is FPN:
            channels = next(iter(module.output_shape().values())).channels
            ref = next(module.parameters())
            up = build_upsampler(kind, channels, **upsampler_kwargs).to(device=ref.device, dtype=ref.dtype)
            for p in up.parameters():
                p.requires_grad_(not freeze)
            # AFIFPN only adds srf_module and reroutes the upsampling; swapping the class keeps
            # every submodule, parameter and buffer of the stock FPN as it is.
            module.__class__ = AFIFPN
            module.install_upsamplers(up)
            converted.append(name)
    if not converted:
        raise ValueError("use_af_interpolator: the model contains no stock detectron2 FPN to convert.")
    if weights:
        load_interpolator_weights(model, weights, what="use_af_interpolator(weights=...)")
    return converted


def afi_fpn(fpn_node: Any, kind: str = "afi", **upsampler_kwargs) -> Any:
    """Turn a LazyConfig ``L(FPN)(...)`` node into ``L(AFIFPN)(..., upsampler=L(build_upsampler)(...))``.

    Usage in a LazyConfig python file::

        from afigan.modeling.convert import afi_fpn
        model.backbone = afi_fpn(model.backbone)            # AF interpolator
        model.backbone = afi_fpn(model.backbone, "bilinear")

    Returns the same (modified) node.
    """
    from detectron2.config import LazyCall as L

    target = fpn_node.get("_target_") if hasattr(fpn_node, "get") else None
    if target not in (FPN, AFIFPN) and not (isinstance(target, str) and target.endswith(("FPN", "fpn.FPN"))):
        raise ValueError(f"afi_fpn expects a LazyConfig node of detectron2's FPN, got _target_={target!r}.")
    fpn_node._target_ = AFIFPN
    fpn_node.upsampler = L(build_upsampler)(name=kind, channels=fpn_node.out_channels, **upsampler_kwargs)
    return fpn_node
