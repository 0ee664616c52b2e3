"""The two classic learned x2 upsamplers used as baselines next to CARAFE, FADE and DySample."""

from typing import Optional, Sequence

import torch
from torch import nn

from .shape import check_feature_map, resize_to

__all__ = ["DeconvUpsampler", "PixelShuffleUpsampler"]


def _check_channels(channels, who: str) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{who} channels must be a positive integer, got {channels!r}.")
    return channels


class DeconvUpsampler(nn.Module):
    """``ConvTranspose2d(C, C, 4, stride=2, padding=1)``: exactly 2h x 2w, C*C*16 + C parameters.

    Init: the per-channel bilinear kernel (outer product of [1, 3, 3, 1] / 4) on the diagonal,
    zero elsewhere and zero bias, the usual FCN initialisation: a fresh deconv equals bilinear x2
    (``align_corners=False``) except on the one-pixel border, where the zero padding of the
    transposed conv drops the outer tap. Starting from interpolation (as DySample and the AF
    interpolator do) keeps a random map out of the top-down path at the start of training.

    Call: ``forward(x, output_size=None, guide=None)``; ``guide`` is ignored.
    """

    guided = False

    def __init__(self, channels: int):
        super().__init__()
        self.channels = _check_channels(channels, type(self).__name__)
        self.deconv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
        with torch.no_grad():
            self.deconv.weight.zero_()
            idx = torch.arange(channels)
            self.deconv.weight[idx, idx] = taps[:, None] * taps[None, :]
            self.deconv.bias.zero_()

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; they would only warn
            check_feature_map(x, self.channels, type(self).__name__)
        return resize_to(self.deconv(x), output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class PixelShuffleUpsampler(nn.Module):
    """3x3 conv C -> 4C, then ``PixelShuffle(2)``: C*4C*9 + 4C parameters.

    Init: ICNR (Aitken et al., 2017): one xavier-uniform C -> C 3x3 kernel copied to the four
    sub-pixel outputs of every channel, zero bias, so a fresh module is that conv followed by
    nearest x2 and has no checkerboard pattern at the start.

    Call: ``forward(x, output_size=None, guide=None)``; ``guide`` is ignored.
    """

    guided = False

    def __init__(self, channels: int):
        super().__init__()
        self.channels = _check_channels(channels, type(self).__name__)
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        base = torch.empty(channels, channels, 3, 3)
        nn.init.xavier_uniform_(base)
        with torch.no_grad():
            # PixelShuffle reads output channel c of sub-pixel s from conv channel c*4 + s.
            self.conv.weight.copy_(base.repeat_interleave(4, dim=0))
            self.conv.bias.zero_()

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; they would only warn
            check_feature_map(x, self.channels, type(self).__name__)
        return resize_to(self.shuffle(self.conv(x)), output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
