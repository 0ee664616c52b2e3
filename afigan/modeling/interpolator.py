"""The interpolator G outside a neck, as stage 1 trains it and the figures and the study run it.

* :func:`finer_level` / :func:`guided_levels`: the one rule for which level guides which (a
  guided kind such as FADE upsamples level l with the finer level l-1 as its guide);
* :class:`LevelwiseGenerator`: G on every level of a pyramid in one forward;
* :func:`load_interpolator`: G built from a config and holding the upsampler tensors of a stage-1,
  stage-2 or detector checkpoint.
"""

from typing import Dict, Optional

import torch
from torch import nn

from afigan.checkpoint import load_interpolator_weights

from .necks import standalone_upsampler_from_config

__all__ = ["FINEST_LEVEL", "finer_level", "guided_levels", "LevelwiseGenerator", "load_interpolator"]

FINEST_LEVEL = 2  # the teacher's pyramid, and every afigan neck's, starts at p2


def finer_level(level: str) -> Optional[str]:
    """The next finer pyramid level: ``"p3" -> "p2"``; None for ``p2``, the finest there is."""
    n = int(level[1:])
    return f"p{n - 1}" if n > FINEST_LEVEL else None


def guided_levels(levels) -> Dict[str, str]:
    """``{level: finer level}`` for the levels that have a finer one (``p3 -> p2``, ...); a
    guided upsampler is trained only on these (``p2`` has no finer level)."""
    return {level: finer for level in levels if (finer := finer_level(level))}


class LevelwiseGenerator(nn.Module):
    """Runs G on every level in a single forward, so DDP sees one call per step.
    {"p2": (N, C, h, w), ...} -> {"p2": (N, C, 2h, 2w), ...}. ``generator`` is one shared
    upsampler or an ``nn.ModuleDict`` with one per level. A guided upsampler (FADE) gets, for
    level l, the low-resolution pyramid's finer level l-1 (``guides``), which has the target's
    size (never the target itself); levels without a guide are left out of the result."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def _for(self, level: str) -> nn.Module:
        return self.generator[level] if isinstance(self.generator, nn.ModuleDict) else self.generator

    def forward(
        self, features: Dict[str, torch.Tensor], guides: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        if guides is None:
            return {k: self._for(k)(v) for k, v in features.items()}
        return {
            k: self._for(k)(v, output_size=guides[k].shape[-2:], guide=guides[k])
            for k, v in features.items()
            if k in guides
        }


def load_interpolator(cfg, weights: str) -> nn.Module:
    """Stage 1's G for ``cfg``: the upsampler ``MODEL.AFI.INTERP`` with ``MODEL.FPN.OUT_CHANNELS``
    channels and its ``MODEL.AFI`` options (with ``MODEL.AFI.SHARED False``, an ``nn.ModuleDict``
    with one per level of ``MODEL.AFI.LEVELS``), holding the upsampler tensors of ``weights`` (a
    stage-1 ``G_0`` file, a stage-2 ``AFExtractor`` checkpoint or a detector; ``""``: random
    init), loaded by :func:`afigan.checkpoint.load_interpolator_weights`; frozen, in eval mode,
    on ``MODEL.DEVICE``."""
    g = standalone_upsampler_from_config(cfg, freeze=True, what="--interpolation")
    if weights:
        load_interpolator_weights(g, weights, "--interpolation WEIGHTS")
    return g.eval().to(torch.device(cfg.MODEL.DEVICE))
