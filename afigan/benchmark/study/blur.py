"""The blur measure of the study's curves: does an x2 upsampling keep the target's fine detail?

AFI-GAN's claim is that nearest and bilinear interpolation give "noisy and blurred features". Blur
is missing high-frequency energy, so both numbers here look at feature maps after a 3x3
Laplacian (per channel, ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]``, valid positions only, so no
padding invents an edge):

* ``hf_l1``: mean |Lap(pred) - Lap(target)| = mean |Lap(pred - target)|: the error restricted to
  high frequencies (0 for an exact prediction);
* ``hf_ratio``: sum Lap(pred)^2 / sum Lap(target)^2, the upsampled map's high-frequency energy
  relative to the target's: 1 for an exact prediction, below 1 for a blurred one (a smooth
  interpolation), above 1 for one that adds high-frequency content the target lacks (noise,
  nearest's blocks).

Pure PyTorch; a prediction and its target are compared on their common top-left window, as the
content loss and :class:`afigan.benchmark.study.fidelity.ErrorSums` do.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch.nn import functional as F

from afigan.layers import crop_to_common

__all__ = ["laplacian", "BlurSums", "blur_scores"]

_KERNEL = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H - 2, W - 2): the 3x3 Laplacian of every channel at the positions
    whose whole neighbourhood lies inside the map (empty when H or W < 3)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.new_zeros((n, c, max(h - 2, 0), max(w - 2, 0)))
    k = _KERNEL.to(x).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    return F.conv2d(x, k, groups=c)


@dataclass
class BlurSums:
    """Running sums of one (interpolator, level) over every image."""

    count: int = 0
    abs_hf_err: float = 0.0
    hf_pred: float = 0.0
    hf_target: float = 0.0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = crop_to_common(pred.double(), target.double())
        lp, lt = laplacian(pred), laplacian(target)
        self.count += lt.numel()
        self.abs_hf_err += float((lp - lt).abs().sum())
        self.hf_pred += float(lp.pow(2).sum())
        self.hf_target += float(lt.pow(2).sum())

    def scores(self) -> Dict[str, float]:
        """``hf_l1`` and ``hf_ratio`` (see the module docstring); NaN where nothing was added."""
        nan = float("nan")
        return {
            "hf_l1": self.abs_hf_err / self.count if self.count else nan,
            "hf_ratio": self.hf_pred / self.hf_target if self.hf_target > 0 else nan,
        }


def blur_scores(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """``{"hf_l1", "hf_ratio"}`` of one prediction against its target ((N, C, H, W) each)."""
    sums = BlurSums()
    sums.add(pred, target)
    return sums.scores()
