"""The switches that change how fast a stage runs, never what it computes (beyond float rounding):
``MODEL.AFI.CHANNELS_LAST`` (memory format) and ``MODEL.AFI.COMPILE`` (torch.compile of G, D and
the neck's upsampler). Mixed precision is :class:`afigan.engine.amp.AMPPolicy`. Which of them
pays off where is measured by tools/benchmark_roofline.py (README, "Performance")."""

import logging
import shutil
from typing import List

import torch
from torch import nn

from afigan.checkpoint import find_interpolators

__all__ = ["to_memory_format", "compile_modules", "compile_unavailable_reason", "upsampler_modules"]

logger = logging.getLogger(__name__)


def to_memory_format(cfg, *modules: nn.Module) -> None:
    """Put ``modules``' 4-D parameters in channels_last when ``MODEL.AFI.CHANNELS_LAST``: convolutions
    then return channels_last maps and the layers after them keep that format."""
    if cfg.MODEL.AFI.CHANNELS_LAST:
        for m in modules:
            m.to(memory_format=torch.channels_last)


def compile_unavailable_reason(device: str, backend: str) -> str:
    """Why torch.compile cannot run here ("" when it can)."""
    try:
        import torch._dynamo
    except ImportError as e:  # pragma: no cover - every supported torch has it
        return f"torch._dynamo cannot be imported ({e})"
    if not torch._dynamo.is_dynamo_supported():
        return "this Python/torch build does not support torch.compile"
    if (
        backend == "inductor"
        and not device.startswith("cuda")
        and not any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    ):
        return "the inductor backend needs a C++ compiler (g++) on a CPU, and none is on PATH"
    return ""


def upsampler_modules(model: nn.Module) -> List[nn.Module]:
    """Every neck upsampler of ``model`` (each per-level one of a ModuleDict) or the model itself
    when it is one (stage 1's G)."""
    found = []
    for _, module, shared in find_interpolators(model):
        found.extend([module] if shared else list(module.values()))
    return found


def compile_modules(cfg, modules: List[nn.Module], what: str) -> bool:
    """``module.compile()`` (in place: state-dict keys unchanged) each of ``modules`` when
    ``MODEL.AFI.COMPILE``; returns whether it did. Where compilation is unavailable it logs one
    sentence and keeps eager mode; a graph that fails to compile later also falls back to eager
    (dynamo's ``suppress_errors``) instead of stopping the training."""
    if not cfg.MODEL.AFI.COMPILE or not modules:
        return False
    backend = cfg.MODEL.AFI.COMPILE_BACKEND
    reason = compile_unavailable_reason(cfg.MODEL.DEVICE, backend)
    if reason:
        logger.warning("MODEL.AFI.COMPILE: %s; %s runs in eager mode.", reason, what)
        return False
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for m in modules:
        m.compile(backend=backend)
    logger.info("MODEL.AFI.COMPILE: compiled %s with torch.compile (backend %r).", what, backend)
    return True
