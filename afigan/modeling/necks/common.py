"""Pieces every afigan neck shares: the upsampler built from config, freezing, norm fallback."""
from typing import Optional

from torch import nn

from afigan.config import afi_freeze
from afigan.layers import build_upsampler

__all__ = ["upsampler_from_config", "freeze_", "resolve_norm"]


def upsampler_from_config(cfg, channels: int) -> nn.Module:
    """The neck's one shared upsampler (``srf_module``): kind ``MODEL.AFI.INTERP`` with the
    interpolator hyper-parameters of ``MODEL.AFI``; frozen when ``MODEL.AFI_FREEZE``."""
    a = cfg.MODEL.AFI
    kwargs = {}
    if a.INTERP == "afi":
        kwargs = dict(num_blocks=a.NUM_BLOCKS, growth=a.GROWTH, res_scale=a.RES_SCALE, skip=a.SKIP)
    try:
        up = build_upsampler(a.INTERP, channels, **kwargs)
    except ValueError as e:
        raise ValueError(f"MODEL.AFI.INTERP: {e}") from None
    return freeze_(up) if afi_freeze(cfg) else up


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter, so Detectron2's optimizer skips them."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def resolve_norm(norm: Optional[str]) -> str:
    """"SyncBN" -> "BN" unless several processes run: one process has nothing to sync with."""
    from detectron2.utils import comm

    if norm in ("SyncBN", "nnSyncBN", "naiveSyncBN") and comm.get_world_size() == 1:
        return "BN"
    return norm or ""
