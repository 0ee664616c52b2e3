"""FADE (Lu, Liu, Cao, "FADE: Fusing the Assets of Decoder and Encoder for Task-Agnostic
Upsampling", ECCV 2022) in pure PyTorch: a *guided* x2 upsampler.

The mathematics follow the authors' public ``poppinace/fade`` (``FADE_H2L.py`` and
``pytorch_implementation/FADE_H2L.py``); the parameter names (``gate_generator.conv``,
``kernel_generator.conv1_en`` / ``conv1_de`` / ``conv2_kernels`` / ``conv2_bias``) are theirs, so
their state dicts load unchanged. Reassembly is :func:`carafe_reassemble`.
"""

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .carafe import carafe_reassemble, check_odd_kernel, reassemble_in_float32
from .shape import check_feature_map, fit_to, resize_to

__all__ = ["FADE", "FADEGateGenerator", "SemiShift"]


class FADEGateGenerator(nn.Module):
    """``sigmoid(nearest_x2(conv1x1(de)))``: per-pixel weight of the encoder (guide) feature."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, de: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.interpolate(self.conv(de), scale_factor=2.0, mode="nearest"))


class SemiShift(nn.Module):
    """Semi-shift kernel generator: raw (pre-softmax) kernels (N, up_kernel^2, 2h, 2w).

    Both features are compressed to ``embedding`` channels by 1x1 convs; one shared 3x3 conv
    (``conv2_kernels``, ``conv2_bias``) is applied to each. For the x2 pixel (2i+a, 2j+b) the
    kernel is ``conv2(en)`` on the 3x3 encoder window centred at (2i+a, 2j+b) plus ``conv2(de)``
    on the 3x3 decoder window centred at (i, j), each with the bias, zero padding at the borders.
    The authors evaluate the encoder term as a stride-2 conv over four one-pixel-shifted paddings;
    that equals one stride-1, padding-1 conv over the full x2 map, which is what is computed here.
    """

    def __init__(self, channels: int, embedding: int = 64, up_kernel: int = 5):
        super().__init__()
        self.conv1_en = nn.Conv2d(channels, embedding, 1)
        self.conv1_de = nn.Conv2d(channels, embedding, 1, bias=False)
        self.conv2_kernels = nn.Parameter(torch.empty(up_kernel**2, embedding, 3, 3))
        self.conv2_bias = nn.Parameter(torch.zeros(up_kernel**2))
        # The authors' mmcv version: xavier-uniform 1x1 convs (zero bias), xavier-normal 3x3 kernels.
        nn.init.xavier_uniform_(self.conv1_en.weight)
        nn.init.zeros_(self.conv1_en.bias)
        nn.init.xavier_uniform_(self.conv1_de.weight)
        nn.init.xavier_normal_(self.conv2_kernels)

    def forward(self, en: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
        k_en = F.conv2d(self.conv1_en(en), self.conv2_kernels, self.conv2_bias, padding=1)
        k_de = F.conv2d(self.conv1_de(de), self.conv2_kernels, self.conv2_bias, padding=1)
        return k_en + F.interpolate(k_de, scale_factor=2.0, mode="nearest")


class FADE(nn.Module):
    """FADE x2 upsampler: ``gate * en + (1 - gate) * CARAFE(de, softmax(semi_shift(en, de)))``.

    ``de`` is the coarse feature being upsampled (x, (N, C, h, w)); ``en`` is the finer guide
    (``guide``, (N, C, H, W), e.g. an FPN lateral), fitted to 2h x 2w first (bottom/right crop or
    edge pad; H and W may each be 2h or 2w plus or minus one).

    Args:
        channels: C, shared by the feature and its guide.
        up_kernel: odd reassembly kernel size (the authors' ``up_kernel_size``, 5).
        embedding: channels of the kernel generator's compressed features (the authors'
            ``embedding_dim``, 64).

    Init as the authors' mmcv version (xavier-uniform 1x1 convs, xavier-normal 3x3 kernels, zero
    biases). Parameters at 256 channels: 257 + 16,448 + 16,384 + 14,400 + 25 = 47,514.

    Call: ``forward(x, output_size=None, guide=None)``; ``guide`` is required.
    """

    guided = True
    # The reassembly accumulated in float32 for a half-precision x (reassemble_in_float32); False: in x's dtype.
    float32_island = True

    def __init__(self, channels: int, up_kernel: int = 5, embedding: int = 64):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"FADE channels must be a positive integer, got {channels!r}.")
        check_odd_kernel(up_kernel, "FADE up_kernel")
        if isinstance(embedding, bool) or not isinstance(embedding, int) or embedding < 1:
            raise ValueError(f"FADE embedding must be a positive integer, got {embedding!r}.")
        self.channels = channels
        self.up_kernel = up_kernel
        self.gate_generator = FADEGateGenerator(channels)
        self.kernel_generator = SemiShift(channels, embedding, up_kernel)

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        who = type(self).__name__
        if guide is None:
            raise ValueError(
                f"{who} is a guided upsampler: pass guide=, the finer (N, {self.channels}, H, W) feature map."
            )
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; they would only warn
            self._check_inputs(x, guide)
        # Under tracing h and w are traced sizes and fit_to gathers (no replicate pad, whose ONNX
        # export reverses its pads with a step -1 Slice), so the graph fits any input size.
        h, w = x.shape[-2], x.shape[-1]
        en = fit_to(guide, (2 * h, 2 * w))
        gate = self.gate_generator(x)
        kernels = F.softmax(self.kernel_generator(en, x), dim=1)
        reassemble = reassemble_in_float32 if self.float32_island else carafe_reassemble
        out = gate * en + (1 - gate) * reassemble(x, kernels, self.up_kernel, 2)
        return resize_to(out, output_size, x.shape[-2:])

    def _check_inputs(self, x: torch.Tensor, guide: torch.Tensor) -> None:
        who = type(self).__name__
        check_feature_map(x, self.channels, who)
        check_feature_map(guide, self.channels, f"{who} guide")
        h, w = x.shape[-2:]
        gh, gw = guide.shape[-2:]
        if abs(gh - 2 * h) > 1 or abs(gw - 2 * w) > 1 or guide.shape[0] != x.shape[0]:
            raise ValueError(
                f"{who} guide must be (N, C, H, W) with N = {x.shape[0]}, H in {2 * h - 1}..{2 * h + 1} and "
                f"W in {2 * w - 1}..{2 * w + 1} for a {h}x{w} input, got {tuple(guide.shape)}."
            )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, up_kernel={self.up_kernel}"
