"""Split-attention convolution of ResNeSt (spec §12.1), with Detectron2 norms.

Module names (``conv``, ``bn0``, ``fc1``, ``bn1``, ``fc2``) and the channel order of the
attention logits follow the detectron2-ResNeSt port, so its checkpoints load and behave the same.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import get_norm

__all__ = ["SplAtConv2d", "rsoftmax"]


def rsoftmax(logits: torch.Tensor, radix: int, cardinality: int) -> torch.Tensor:
    """Attention weights from fc2's logits.

    Args:
        logits: (N, radix * C, 1, 1), channels ordered (cardinality, radix, C / cardinality) as fc2
            (a grouped conv, one group per cardinal group) produces them.
    Returns:
        (N, radix * C, 1, 1) ordered (radix, cardinality, C / cardinality), so that chunk ``r`` of
        ``split(C)`` weighs split ``r``. With radix > 1 the weights of one channel sum to 1 across
        the radix splits (softmax); with radix 1 it is a per-channel sigmoid gate.
    """
    n = logits.shape[0]
    if radix > 1:
        x = logits.reshape(n, cardinality, radix, -1).transpose(1, 2)
        return F.softmax(x, dim=1).reshape(n, -1, 1, 1)
    return torch.sigmoid(logits)


class SplAtConv2d(nn.Module):
    """Split-attention 3x3 conv: ``radix`` grouped branches mixed by channel attention.

    Args:
        in_channels: input channels C_in.
        channels: output channels C (must be divisible by ``groups``).
        kernel_size, stride, padding, dilation: of the branch conv.
        groups: cardinality; the branch conv uses ``groups * radix`` groups.
        radix: number of splits R (>= 1).
        norm: Detectron2 norm name for bn0/bn1 ("" = none).
        reduction_factor: fc1 width is ``max(in_channels * radix // reduction_factor, 32)``.
    Input (N, C_in, H, W) -> output (N, C, H', W'), H' = conv output size.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False,
                 radix: int = 2, norm: Optional[str] = "BN", reduction_factor: int = 4):
        super().__init__()
        if radix < 1:
            raise ValueError(f"SplAtConv2d radix must be >= 1, got {radix}.")
        if channels % groups:
            raise ValueError(f"SplAtConv2d channels ({channels}) must be divisible by groups ({groups}).")
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.cardinality = groups
        self.channels = channels
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                              groups=groups * radix, bias=bias)
        # get_norm returns None for "" (no norm), as in the reference's `use_bn` switch.
        self.bn0 = get_norm(norm, channels * radix)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=groups)
        self.bn1 = get_norm(norm, inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn0 is not None:
            x = self.bn0(x)
        x = F.relu(x)
        splits = torch.split(x, self.channels, dim=1) if self.radix > 1 else (x,)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        gap = self.fc1(gap)
        if self.bn1 is not None:
            gap = self.bn1(gap)
        atten = rsoftmax(self.fc2(F.relu(gap)), self.radix, self.cardinality)
        attens = torch.split(atten, self.channels, dim=1)
        return sum(a * s for a, s in zip(attens, splits)).contiguous()
