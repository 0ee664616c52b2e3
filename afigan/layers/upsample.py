"""Upsampler registry: every x2 upsampler a neck can use, behind one call signature.

Each upsampler is an ``nn.Module`` called as ``up(x, output_size=None, guide=None)``: x is
(N, C, h, w); the result is (N, C, 2h, 2w), or (N, C, H, W) when ``output_size`` is given
(bottom/right crop or edge padding of the x2 map). ``guide`` is the finer-level feature
(N, C, H, W); only guided kinds (class attribute ``guided = True``, see :func:`is_guided`) read
it, the others ignore it. Necks therefore never special-case one kind.

Kinds: "nearest", "bilinear" (parameter-free), "afi" (the AF interpolator), "dysample", "carafe",
"fade" (guided), "deconv", "pixelshuffle". :func:`upsampler_kwargs` lists each kind's keyword
arguments and their defaults.
"""

import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .af_interpolator import AFInterpolator
from .carafe import CARAFE
from .dysample import DySample
from .fade import FADE
from .learned_baselines import DeconvUpsampler, PixelShuffleUpsampler
from .shape import check_feature_map, resize_to

__all__ = [
    "UPSAMPLERS",
    "register_upsampler",
    "build_upsampler",
    "InterpolateUpsampler",
    "upsampler_kinds",
    "upsampler_kwargs",
    "is_guided",
]

UPSAMPLERS: Dict[str, Callable[..., nn.Module]] = {}
# Kind -> whether its modules need ``guide`` (known without building one).
_GUIDED: Dict[str, bool] = {}


def register_upsampler(name: str, guided: bool = False):
    """Decorator adding a factory ``f(channels, **kwargs) -> nn.Module`` under ``name``.

    ``guided``: whether the modules it builds read ``guide`` (their class attribute ``guided``).
    Keyword parameters with defaults in the factory's signature are what :func:`upsampler_kwargs`
    reports; a factory taking ``**kwargs`` accepts (and may ignore) anything.
    """

    def wrap(factory):
        if name in UPSAMPLERS:
            raise KeyError(f"An upsampler named {name!r} is already registered.")
        UPSAMPLERS[name] = factory
        _GUIDED[name] = bool(guided)
        return factory

    return wrap


class InterpolateUpsampler(nn.Module):
    """Parameter-free x2 interpolation ("nearest" or "bilinear", align_corners=False)."""

    guided = False

    def __init__(self, mode: str = "nearest", channels: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.channels = channels

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
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
def _afi(
    channels: int,
    *,
    num_blocks: int = 3,
    growth: int = 32,
    res_scale: float = 0.2,
    skip: str = "bilinear",
    init_scale: float = 0.1,
) -> nn.Module:
    # Spelled out (the AFInterpolator defaults) so that upsampler_kwargs("afi") can list them.
    return AFInterpolator(channels, num_blocks, growth, res_scale, skip, init_scale)


@register_upsampler("dysample")
def _dysample(channels: int, *, style: str = "lp", groups: int = 4, dyscope: bool = False) -> nn.Module:
    return DySample(channels, style=style, groups=groups, dyscope=dyscope)


@register_upsampler("carafe")
def _carafe(channels: int, *, up_kernel: int = 5, encoder_kernel: int = 3, compressed_channels: int = 64) -> nn.Module:
    return CARAFE(channels, up_kernel=up_kernel, encoder_kernel=encoder_kernel, compressed_channels=compressed_channels)


@register_upsampler("fade", guided=True)
def _fade(channels: int, *, up_kernel: int = 5, embedding: int = 64) -> nn.Module:
    return FADE(channels, up_kernel=up_kernel, embedding=embedding)


@register_upsampler("deconv")
def _deconv(channels: int) -> nn.Module:
    return DeconvUpsampler(channels)


@register_upsampler("pixelshuffle")
def _pixelshuffle(channels: int) -> nn.Module:
    return PixelShuffleUpsampler(channels)


def upsampler_kinds():
    """Names accepted by :func:`build_upsampler`, sorted."""
    return sorted(UPSAMPLERS)


def _check_kind(name: str) -> None:
    if name not in UPSAMPLERS:
        raise ValueError(f"Unknown upsampler kind {name!r}; expected one of {upsampler_kinds()}.")


def _accepts_anything(factory) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())


def upsampler_kwargs(kind: str) -> Dict[str, Any]:
    """``{keyword: default}`` accepted by :func:`build_upsampler` for ``kind``, from its factory.

    The parameter-free kinds ("nearest", "bilinear") accept none (they ignore extra keywords).
    """
    _check_kind(kind)
    params = list(inspect.signature(UPSAMPLERS[kind]).parameters.values())[1:]  # after channels
    return {
        p.name: p.default
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is not inspect.Parameter.empty
    }


def is_guided(kind_or_module: Union[str, nn.Module]) -> bool:
    """Whether a kind (registry name) or an upsampler module needs ``guide`` in its call."""
    if isinstance(kind_or_module, str):
        _check_kind(kind_or_module)
        return _GUIDED[kind_or_module]
    if isinstance(kind_or_module, nn.Module):
        return bool(getattr(kind_or_module, "guided", False))
    raise ValueError(f"is_guided expects an upsampler kind name or module, got {type(kind_or_module).__name__}.")


def build_upsampler(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the upsampler registered as ``name`` for ``channels``-channel features.

    Keyword arguments go to the upsampler (see :func:`upsampler_kwargs`, e.g. ``num_blocks``,
    ``growth`` for "afi", ``style``, ``groups``, ``dyscope`` for "dysample"); a keyword the kind
    does not accept is a ValueError, except that the parameter-free kinds ignore them all.
    """
    _check_kind(name)
    factory = UPSAMPLERS[name]
    if not _accepts_anything(factory):
        accepted = upsampler_kwargs(name)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown keyword argument(s) {unknown} for upsampler kind {name!r}; accepted: {sorted(accepted)}."
            )
    return factory(channels, **kwargs)
