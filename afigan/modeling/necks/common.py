"""The neck's upsamplers built from config, and the one way a neck calls them.

A neck holds either ONE shared upsampler ``srf_module`` (``MODEL.AFI.SHARED True``, AFI-GAN's
layout: the reference checkpoints' keys) or one per top-down step, ``srf_modules[<level>]``
keyed by the level the step produces (``SHARED False``, mmdetection's layout for learned
upsamplers). Guided kinds (FADE) also receive the finer level's lateral.
"""

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from afigan.config import afi_freeze
from afigan.layers import build_upsampler, upsampler_config_node, upsampler_kinds, upsampler_kwargs

__all__ = [
    "upsampler_from_config",
    "neck_upsampler_from_config",
    "standalone_upsampler_from_config",
    "attach_upsamplers",
    "upsample_step",
    "upsampler_options",
    "freeze_",
]

Upsamplers = Union[nn.Module, Mapping[str, nn.Module]]


def upsampler_options(cfg, kind: str):
    """``(config node name, keyword arguments)`` of ``kind``'s options in ``MODEL.AFI``, one per
    keyword parameter of its factory (``afigan.config.add_upsampler_config`` made the keys). A key
    the cfg lacks (a kind registered after the cfg was made) gives the factory's default. Kinds
    without options give ``("MODEL.AFI.INTERP", {})``."""
    defaults = upsampler_kwargs(kind)
    if not defaults:
        return "MODEL.AFI.INTERP", {}
    name = upsampler_config_node(kind)
    node = cfg.MODEL.AFI.get(name, None) if name else cfg.MODEL.AFI
    kwargs = {k: (node.get(k.upper(), v) if node is not None else v) for k, v in defaults.items()}
    keys = f"MODEL.AFI.{name}" if name else "MODEL.AFI.{" + ",".join(k.upper() for k in defaults) + "}"
    return keys, kwargs


def upsampler_from_config(cfg, channels: int, kind: Optional[str] = None, freeze: Optional[bool] = None) -> nn.Module:
    """The one place where ``MODEL.AFI`` becomes an upsampler: kind ``MODEL.AFI.INTERP`` (or
    ``kind``) with its options (``upsampler_options``); frozen when ``MODEL.AFI_FREEZE`` (or
    ``freeze``). Used by every neck and by stage 1's G."""
    kind = cfg.MODEL.AFI.INTERP if kind is None else kind
    try:
        node, kwargs = upsampler_options(cfg, kind)
    except ValueError as e:  # an unknown kind
        raise ValueError(f"MODEL.AFI.INTERP: {e}") from None
    try:
        up = build_upsampler(kind, channels, **kwargs)
    except ValueError as e:
        key = "MODEL.AFI.INTERP" if node == "MODEL.AFI.INTERP" else f"MODEL.AFI.INTERP {kind!r} with {node}"
        raise ValueError(f"{key}: {e}") from None
    freeze = afi_freeze(cfg) if freeze is None else freeze
    return freeze_(up) if freeze else up


def neck_upsampler_from_config(cfg, channels: int, step_levels: Sequence[str]) -> Upsamplers:
    """The neck's ``upsampler`` argument: one module when ``MODEL.AFI.SHARED``, else a dict
    ``{level: module}`` with one fresh upsampler per top-down step (``step_levels``)."""
    if cfg.MODEL.AFI.SHARED:
        return upsampler_from_config(cfg, channels)
    return {level: upsampler_from_config(cfg, channels) for level in step_levels}


def standalone_upsampler_from_config(cfg, freeze: bool = False, what: str = "stage 1") -> nn.Module:
    """Stage 1's G outside a neck: the upsampler ``MODEL.AFI.INTERP`` with ``MODEL.FPN.OUT_CHANNELS``
    channels and its options, or with ``MODEL.AFI.SHARED False`` an ``nn.ModuleDict`` with one per
    level of ``MODEL.AFI.LEVELS``. A parameter-free kind raises one sentence naming ``what``."""
    a = cfg.MODEL.AFI
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    g = upsampler_from_config(cfg, channels, freeze=freeze)
    if not any(True for _ in g.parameters()):
        learned = ", ".join(k for k in upsampler_kinds() if sum(p.numel() for p in build_upsampler(k, 16).parameters()))
        raise ValueError(
            f"MODEL.AFI.INTERP {a.INTERP!r} has no parameters, so {what} has nothing to train or show; "
            f"set it to a learned kind ({learned})."
        )
    if a.SHARED:
        return g
    return nn.ModuleDict({level: upsampler_from_config(cfg, channels, freeze=freeze) for level in a.LEVELS})


def attach_upsamplers(
    neck: nn.Module, upsampler: Optional[Upsamplers], step_levels: Sequence[str], channels: int
) -> None:
    """Register ``upsampler`` on ``neck``: a module becomes ``srf_module``; a mapping
    ``{level: module}`` (one per entry of ``step_levels``) becomes ``srf_modules``. ``None``
    means a fresh shared AF interpolator."""
    if upsampler is None:
        upsampler = build_upsampler("afi", channels)
    if isinstance(upsampler, nn.Module) and not isinstance(upsampler, nn.ModuleDict):
        neck.srf_module, neck.srf_modules = upsampler, None
        return
    if set(upsampler) != set(step_levels):
        raise ValueError(
            f"Per-level upsamplers must be keyed by the neck's top-down levels {list(step_levels)}, "
            f"got {sorted(upsampler)}."
        )
    neck.srf_module = None
    neck.srf_modules = nn.ModuleDict({level: upsampler[level] for level in step_levels})


def upsample_step(neck: nn.Module, x: torch.Tensor, level: str, lateral: torch.Tensor) -> torch.Tensor:
    """x2-upsample ``x`` to ``lateral``'s size for the top-down step producing ``level``; guided
    upsamplers also get ``lateral`` as their guide. Other modules are called ``up(x, output_size)``,
    so user-supplied upsamplers with the two-argument call keep working."""
    up = neck.srf_module if neck.srf_modules is None else neck.srf_modules[level]
    if getattr(up, "guided", False):
        return up(x, output_size=lateral.shape[-2:], guide=lateral)
    return up(x, output_size=lateral.shape[-2:])


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter, so Detectron2's optimizer skips them."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
