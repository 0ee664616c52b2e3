"""Upsampler registry: every x2 upsampler a neck can use, behind one call signature.

Each upsampler is an ``nn.Module`` called as ``up(x, output_size=None)``: x is (N, C, h, w);
the result is (N, C, 2h, 2w), or (N, C, H, W) when ``output_size`` is given (bottom/right
crop or edge padding of the x2 map). Necks therefore never special-case one kind.
"""
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .af_interpolator import AFInterpolator
from .shape import check_feature_map, resize_to

__all__ = ["UPSAMPLERS", "register_upsampler", "build_upsampler", "InterpolateUpsampler", "upsampler_kinds"]

UPSAMPLERS: Dict[str, Callable[..., nn.Module]] = {}


def register_upsampler(name: str):
    """Decorator adding a factory ``f(channels, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(factory):
        if name in UPSAMPLERS:
            raise KeyError(f"An upsampler named {name!r} is already registered.")
        UPSAMPLERS[name] = factory
        return factory

    return wrap


class InterpolateUpsampler(nn.Module):
    """Parameter-free x2 interpolation ("nearest" or "bilinear", align_corners=False)."""

    def __init__(self, mode: str = "nearest", channels: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.channels = channels

    def forward(self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_feature_map(x, self.channels, f"{self.mode} upsampler")
        kwargs = {"align_corners": False} if self.mode == "bilinear" else {}
        # scale_factor=2.0 (not size=) so that, exactly like Detectron2's FPN, pixel i of the
        # output reads pixel i // 2 of the input; crop/pad then fixes odd laterals.
        out = F.interpolate(x, scale_factor=2.0, mode=self.mode, **kwargs)
        return resize_to(out, output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


@register_upsampler("nearest")
def _nearest(channels: int, **kwargs) -> nn.Module:
    return InterpolateUpsampler("nearest", channels)


@register_upsampler("bilinear")
def _bilinear(channels: int, **kwargs) -> nn.Module:
    return InterpolateUpsampler("bilinear", channels)


@register_upsampler("afi")
def _afi(channels: int, **kwargs) -> nn.Module:
    return AFInterpolator(channels=channels, **kwargs)


def upsampler_kinds():
    """Names accepted by :func:`build_upsampler`, sorted."""
    return sorted(UPSAMPLERS)


def build_upsampler(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the upsampler registered as ``name`` for ``channels``-channel features.

    Extra keyword arguments go to the upsampler (e.g. ``num_blocks``, ``growth`` for "afi");
    the parameter-free kinds ignore them.
    """
    if name not in UPSAMPLERS:
        raise ValueError(f"Unknown upsampler kind {name!r}; expected one of {upsampler_kinds()}.")
    return UPSAMPLERS[name](channels, **kwargs)
