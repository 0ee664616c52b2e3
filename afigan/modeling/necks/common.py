"""The neck's one shared upsampler (``srf_module``) built from config, and freezing it."""
from typing import Optional

from torch import nn

from afigan.config import afi_freeze
from afigan.layers import build_upsampler

__all__ = ["upsampler_from_config", "freeze_"]


def upsampler_from_config(cfg, channels: int, kind: Optional[str] = None, freeze: Optional[bool] = None) -> nn.Module:
    """The one place where ``MODEL.AFI`` becomes an upsampler: kind ``MODEL.AFI.INTERP`` (or
    ``kind``) with the interpolator sizes ``NUM_BLOCKS``, ``GROWTH``, ``RES_SCALE``, ``SKIP``;
    frozen when ``MODEL.AFI_FREEZE`` (or ``freeze``). Used by every neck and by stage 1's G."""
    a = cfg.MODEL.AFI
    kind = a.INTERP if kind is None else kind
    kwargs = {}
    if kind == "afi":
        kwargs = dict(num_blocks=a.NUM_BLOCKS, growth=a.GROWTH, res_scale=a.RES_SCALE, skip=a.SKIP)
    try:
        up = build_upsampler(kind, channels, **kwargs)
    except ValueError as e:
        raise ValueError(f"MODEL.AFI.INTERP: {e}") from None
    freeze = afi_freeze(cfg) if freeze is None else freeze
    return freeze_(up) if freeze else up


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter, so Detectron2's optimizer skips them."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
