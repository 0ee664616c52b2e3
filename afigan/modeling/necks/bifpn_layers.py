"""Building blocks of the BiFPN neck (after sxhxliang/detectron2_backbone).

Module and parameter names follow the reference so its checkpoints load strictly:
``SeparableConv2d.{depthwise, pointwise, norm}``, ``PointwiseConvNorm.{conv, norm}``, and the pre-BiFPN
``before_bifpn.{lateral3..5, top_block.p6, p4_skip, p5_skip}``.
"""

from typing import List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import get_norm
from torch import nn
from torch.nn import functional as F

from afigan.layers.shape import fit_to

__all__ = ["SeparableConv2d", "PointwiseConvNorm", "static_same_max_pool", "fuse", "TopBlockP6P7", "BiFPNInput"]

# Reference BN settings of the BiFPN (TensorFlow EfficientDet defaults in PyTorch terms).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
# Epsilon of the fast normalised fusion (EfficientDet), corrected mode only.
FUSION_EPS = 1e-4


def _tf_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """Detectron2's ``get_norm`` with the BiFPN's TensorFlow BN settings (eps 1e-3, momentum 0.01)."""
    layer = get_norm(norm, channels)
    if layer is not None:
        if hasattr(layer, "eps"):
            layer.eps = BN_EPS
        if hasattr(layer, "momentum"):
            layer.momentum = BN_MOMENTUM
    return layer


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (bias, default init) + plain BN (eps 1e-3, momentum 0.01): never SyncBN, as in
    the reference's pre-BiFPN layer (docs/differences_from_reference.md, O6)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1), _tf_norm("BN", out_channels))


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (no bias) -> pointwise 1x1 (bias) -> norm (eps 1e-3, momentum 0.01), no
    activation. (N, C, H, W) -> (N, C_out, H, W); "static same" padding of a 3x3/1 conv is one
    zero pixel on every side."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "BN"):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)
        self.norm = _tf_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(x))
        return self.norm(x) if self.norm is not None else x


class PointwiseConvNorm(nn.Module):
    """1x1 conv with bias (c2-xavier init) followed by an optional norm; (N, C, H, W) -> (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = ""):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        weight_init.c2_xavier_fill(self.conv)
        self.norm = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x


def static_same_max_pool(x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """TF-"SAME" 3x3 / stride-2 max pool of (N, C, H, W) -> (N, C, floor(H/2), floor(W/2)).

    As the reference, the one pixel of padding goes to the right/bottom and is **zero**, not
    -inf. A dimension of 1 gets one extra zero so it pools to 1 instead of failing. ``size``
    crops or edge-pads the result to the map it is fused with (odd inputs).
    """
    h, w = x.shape[-2:]
    if torch.jit.is_tracing():
        # max(1, 3 - w) would freeze the traced size. Two zero columns/rows for every size, then
        # the result cut to max(1, floor(W/2)), gives the same values: the second pad column only
        # ever falls in the window the cut drops. Sizes stay traced (0-dim tensors).
        x = F.max_pool2d(F.pad(x, (0, 2, 0, 2)), kernel_size=3, stride=2)
        x = x[..., : torch.clamp(h // 2, min=1), : torch.clamp(w // 2, min=1)]
    else:
        x = F.max_pool2d(F.pad(x, (0, max(1, 3 - w), 0, max(1, 3 - h))), kernel_size=3, stride=2)
    return fit_to(x, size) if size is not None else x


def fuse(weights: torch.Tensor, inputs: List[torch.Tensor], normalised: bool) -> torch.Tensor:
    """Weighted sum of equally-shaped maps. ``normalised`` = EfficientDet's fast normalised fusion
    ``relu(w) / (sum relu(w) + 1e-4)``; otherwise the raw weights (reference behaviour, O6 of
    docs/differences_from_reference.md)."""
    if normalised:
        weights = F.relu(weights)
        weights = weights / (weights.sum() + FUSION_EPS)
    out = weights[0] * inputs[0]
    for w, x in zip(weights[1:], inputs[1:]):
        out = out + w * x
    return out


class TopBlockP6P7(nn.Module):
    """p6 = pool(norm(conv1x1(C5))), p7 = pool(p6), with :func:`static_same_max_pool`."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = ""):
        super().__init__()
        self.p6 = PointwiseConvNorm(in_channels, out_channels, norm)

    def forward(self, c5: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        p6 = static_same_max_pool(self.p6(c5))
        return p6, static_same_max_pool(p6)


class BiFPNInput(nn.Module):
    """The reference's pre-BiFPN layer (``before_bifpn``).

    forward(c3, c4, c5) with (N, C_i, H_i, W_i) maps at strides 8/16/32 returns
    ``laterals = [c3', c4', c5', p6, p7]`` (each (N, C, ...), strides 8..128) and
    ``skips = [c4_skip, c5_skip]``: separate 1x1 conv + BN projections of C4 / C5 that layer 0's
    bottom-up pass fuses instead of the laterals.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, norm: str = ""):
        super().__init__()
        c3, c4, c5 = in_channels
        self.lateral3 = _conv_bn(c3, out_channels)
        self.lateral4 = _conv_bn(c4, out_channels)
        self.lateral5 = _conv_bn(c5, out_channels)
        self.top_block = TopBlockP6P7(c5, out_channels, norm)
        self.p4_skip = _conv_bn(c4, out_channels)
        self.p5_skip = _conv_bn(c5, out_channels)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor):
        p6, p7 = self.top_block(c5)
        laterals = [self.lateral3(c3), self.lateral4(c4), self.lateral5(c5), p6, p7]
        return laterals, [self.p4_skip(c4), self.p5_skip(c5)]
