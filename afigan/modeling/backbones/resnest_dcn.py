"""Deformable convolutions of the deformable ResNeSt blocks (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``),
on ``torchvision.ops.deform_conv2d``.

Detectron2's ``DeformConv`` / ``ModulatedDeformConv`` (what the reference builds) run forward on
CPU only without modulation and with one deformable group, and backward not at all on CPU;
torchvision's op has CPU and CUDA kernels for both directions, groups, offset groups and masks, and
reads offsets in the same layout ((dy, dx) per kernel tap, per offset group). The modules keep
Detectron2's parameter names (``weight``, ``bias`` when asked for, ``norm.*``), so the reference's
deformable ResNeSt checkpoints keep their keys.
"""

from typing import Optional, Tuple

import torch
from detectron2.layers import get_norm
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv", "DeformSplitAttn", "split_offset_mask", "offset_channels"]


def offset_channels(modulated: bool, num_groups: int, kernel_size: int = 3) -> int:
    """Channels of the offset conv's output: (2 or 3 with a mask) x k x k per deformable group."""
    return (3 if modulated else 2) * kernel_size * kernel_size * num_groups


def split_offset_mask(raw: Tensor, modulated: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The offset conv's output -> (offset, mask or None), with the reference's convention for
    modulated convs: three equal chunks (a, b, m) along channels, offset = cat(a, b) and
    mask = sigmoid(m), so a zero-initialised offset conv gives zero offsets and masks of 0.5."""
    if not modulated:
        return raw, None
    a, b, m = torch.chunk(raw, 3, dim=1)
    return torch.cat((a, b), dim=1), m.sigmoid()


class DeformConv(nn.Module):
    """Deformable k x k conv (modulated when given a mask), then an optional norm and activation.

    ``forward(x, offset, mask=None)``: x (N, C_in, H, W), offset (N, 2*G*k*k, H', W'), mask
    (N, G*k*k, H', W') or None, G deformable groups (read from the offset's channels) ->
    (N, C_out, H', W'). With zero offsets and no mask (or a mask of ones) it is the plain conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"DeformConv: in_channels {in_channels} and out_channels {out_channels} must be "
                f"divisible by groups {groups}."
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kernel_size, kernel_size)
        self.stride, self.padding, self.dilation = (stride, stride), (padding, padding), (dilation, dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        self.activation = activation
        # Detectron2's DeformConv / ModulatedDeformConv initialisation (the reference's op).
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


def _norm_or_identity(norm: str, channels: int) -> nn.Module:
    # timm's SplitAttn (the plain blocks' conv2) has parameter-free identities without a norm.
    return get_norm(norm, channels) or nn.Identity()


class DeformSplitAttn(nn.Module):
    """Split-attention 3x3 conv whose branch conv is deformable (the reference's ``SplAtConv2d_dcn``).

    The same modules and names as timm's ``SplitAttn`` that the plain blocks use (``conv``,
    ``bn0``, ``fc1``, ``bn1``, ``fc2``) and the same math after the branch conv: norm + ReLU, the
    radix splits summed and average-pooled, fc1 (max(C * radix / 4, 32) channels) -> norm -> ReLU
    -> fc2, softmax across the radix per cardinal group, attention-weighted sum of the splits.

    ``forward(x, offset, mask=None)``: x (N, C, H, W) -> (N, C, H', W').
    """

    def __init__(
        self, channels: int, *, stride: int = 1, dilation: int = 1, groups: int = 1, radix: int = 2, norm: str = "BN"
    ):
        super().__init__()
        if radix < 2:
            raise ValueError(f"DeformSplitAttn needs radix >= 2, got {radix}; radix 1 is a plain DeformConv.")
        self.radix, self.cardinality = radix, groups
        attn_channels = max(channels * radix // 4, 32)
        self.conv = DeformConv(
            channels, channels * radix, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups * radix
        )
        self.bn0 = _norm_or_identity(norm, channels * radix)
        self.fc1 = nn.Conv2d(channels, attn_channels, 1, groups=groups)
        self.bn1 = _norm_or_identity(norm, attn_channels)
        self.fc2 = nn.Conv2d(attn_channels, channels * radix, 1, groups=groups)

    def forward(self, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = F.relu(self.bn0(self.conv(x, offset, mask)))
        n, rc, h, w = x.shape
        splits = x.reshape(n, self.radix, rc // self.radix, h, w)
        gap = splits.sum(dim=1).mean((2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        # fc2's channels are (group, split, c / groups): softmax over the splits of each group.
        attn = logits.view(n, self.cardinality, self.radix, -1).softmax(dim=2).transpose(1, 2)
        attn = attn.reshape(n, self.radix, rc // self.radix, 1, 1)
        return (splits * attn).sum(dim=1)
