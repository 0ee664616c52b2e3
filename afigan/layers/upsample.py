"""Upsampler registry: every x2 upsampler a neck can use, behind one call signature.

Each upsampler is an ``nn.Module`` called as ``up(x, output_size=None, guide=None)``: x is
(N, C, h, w); the result is (N, C, 2h, 2w), or (N, C, H, W) when ``output_size`` is given
(bottom/right crop or edge padding of the x2 map). ``guide`` is the finer-level feature
(N, C, H, W); only guided kinds (class attribute ``guided = True``, see :func:`is_guided`) read
it, the others ignore it. Necks therefore never special-case one kind.

Kinds: "nearest", "bilinear" (parameter-free), "afi" (the AF interpolator), "dysample", "carafe",
"fade" (guided), "deconv", "pixelshuffle". :func:`upsampler_kwargs` lists each kind's keyword
arguments and their defaults.

A kind is one layer file plus one registration: the factory's keyword parameters with defaults are
its options, and the config keys ``MODEL.AFI.<NODE>.<OPTION>`` are made from them
(:func:`upsampler_config_node`, ``afigan.config``), so a new kind needs no edit anywhere else.
Every module :func:`build_upsampler` returns carries its kind in ``upsampler_kind`` (what
checkpoints record, see :func:`upsampler_kind_of`).
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
    "unregister_upsampler",
    "upsampler_kinds",
    "upsampler_kwargs",
    "upsampler_config_node",
    "upsampler_kind_of",
    "is_guided",
]

UPSAMPLERS: Dict[str, Callable[..., nn.Module]] = {}
# Kind -> whether its modules need ``guide`` (known without building one).
_GUIDED: Dict[str, bool] = {}
# Kind -> the node under MODEL.AFI holding its options ("" = MODEL.AFI itself).
_CONFIG_NODE: Dict[str, str] = {}


def register_upsampler(name: str, guided: bool = False, config_node: Optional[str] = None):
    """Decorator adding a factory ``f(channels, **kwargs) -> nn.Module`` under ``name``.

    ``guided``: whether the modules it builds read ``guide`` (their class attribute ``guided``).
    Keyword parameters with defaults in the factory's signature are what :func:`upsampler_kwargs`
    reports, and each becomes the config key ``MODEL.AFI.<config_node>.<PARAMETER>`` (upper case;
    ``config_node`` defaults to ``name.upper()``, "" puts the keys directly under ``MODEL.AFI``);
    a factory taking ``**kwargs`` accepts (and may ignore) anything.
    """

    def wrap(factory):
        if name in UPSAMPLERS:
            raise KeyError(f"An upsampler named {name!r} is already registered.")
        UPSAMPLERS[name] = factory
        _GUIDED[name] = bool(guided)
        _CONFIG_NODE[name] = name.upper() if config_node is None else config_node
        return factory

    return wrap


def unregister_upsampler(name: str) -> None:
    """Remove kind ``name`` from the registry (a kind registered for a test or an experiment)."""
    _check_kind(name)
    for table in (UPSAMPLERS, _GUIDED, _CONFIG_NODE):
        table.pop(name, None)


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


# The AF interpolator's options keep the reference's flat keys MODEL.AFI.NUM_BLOCKS, GROWTH, ...
@register_upsampler("afi", config_node="")
def _afi(
    channels: int,
    *,
    num_blocks: int = 3,  # dense blocks in the interpolator's RRDB
    growth: int = 32,  # dense-block growth rate
    res_scale: float = 0.2,  # residual scale beta
    skip: str = "bilinear",  # the parallel x2 path: "bilinear" | "nearest" | "none"
    init_scale: float = 0.1,  # multiplier of the Kaiming init (0.1 in the reference)
) -> nn.Module:
    # Spelled out (the AFInterpolator defaults) so that upsampler_kwargs("afi") can list them.
    return AFInterpolator(channels, num_blocks, growth, res_scale, skip, init_scale)


# DySample (ICCV 2023): MODEL.AFI.DYSAMPLE.*
@register_upsampler("dysample")
def _dysample(
    channels: int,
    *,
    style: str = "lp",  # "lp" (linear then pixel shuffle) | "pl" (pixel shuffle first)
    groups: int = 4,  # offset groups; channels must be divisible by it
    dyscope: bool = False,  # dynamic offset scope (DySample+)
) -> nn.Module:
    return DySample(channels, style=style, groups=groups, dyscope=dyscope)


# CARAFE (ICCV 2019): MODEL.AFI.CARAFE.*
@register_upsampler("carafe")
def _carafe(
    channels: int,
    *,
    up_kernel: int = 5,  # reassembly kernel k_up
    encoder_kernel: int = 3,  # content-encoder kernel k_enc
    compressed_channels: int = 64,  # channel compressor width
) -> nn.Module:
    return CARAFE(channels, up_kernel=up_kernel, encoder_kernel=encoder_kernel, compressed_channels=compressed_channels)


# FADE (ECCV 2022), guided by the finer lateral: MODEL.AFI.FADE.*
@register_upsampler("fade", guided=True)
def _fade(
    channels: int,
    *,
    up_kernel: int = 5,  # reassembly kernel k_up
    embedding: int = 64,  # kernel-generator embedding width
) -> nn.Module:
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


def upsampler_config_node(kind: str) -> str:
    """The node under ``MODEL.AFI`` holding ``kind``'s options: "DYSAMPLE" for "dysample", "" for
    "afi" (its keys sit directly under ``MODEL.AFI``, as in the reference)."""
    _check_kind(kind)
    return _CONFIG_NODE[kind]


def upsampler_kind_of(module: nn.Module) -> Optional[str]:
    """The registry kind a module was built as (by :func:`build_upsampler`), or None for a module
    built otherwise (a user's own upsampler)."""
    kind = getattr(module, "upsampler_kind", None)
    return kind if isinstance(kind, str) else None


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
    module = factory(channels, **kwargs)
    module.upsampler_kind = name  # checkpoints record it, so nothing has to guess a kind from key names
    return module
