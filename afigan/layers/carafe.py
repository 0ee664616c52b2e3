"""CARAFE (Wang et al., "CARAFE: Content-Aware ReAssembly of FEatures", ICCV 2019) in pure PyTorch.

The mathematics follow mmcv's ``CARAFEPack`` (``open-mmlab/mmcv``, ``mmcv/ops/carafe.py``), whose
reassembly is a compiled op; here it is :func:`carafe_reassemble` (``F.unfold`` + a batched
matrix product), which runs on any device and traces/exports to ONNX.
"""

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .precision import float32_island, is_half
from .shape import check_feature_map, resize_to

__all__ = ["CARAFE", "carafe_reassemble", "reassemble_in_float32", "check_odd_kernel"]


def check_odd_kernel(value, name: str) -> int:
    """Return ``value`` if it is a positive odd int, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer (1, 3, 5, ...), got {value!r}.")
    return value


def carafe_reassemble(x: torch.Tensor, kernels: torch.Tensor, k_up: int, scale: int) -> torch.Tensor:
    """Content-aware reassembly: ``out[n, c, i, j] = sum_k kernels[n, k, i, j] * x[n, c, i//s + dy_k, j//s + dx_k]``.

    Args:
        x: source features (N, C, h, w).
        kernels: (N, k_up**2, scale*h, scale*w) reassembly kernels, one per output pixel (already
            normalised, e.g. softmax over dim 1); kernel index k = (dy + r) * k_up + (dx + r) for
            offsets dy, dx in [-r, r], r = k_up // 2 (row-major, as ``F.unfold`` orders them).
        k_up: odd reassembly kernel size.
        scale: integer upsampling ratio.

    Out-of-range source pixels count as zero, as in the CARAFE op. Returns (N, C, scale*h, scale*w).
    """
    n, c, h, w = x.shape
    r = k_up // 2
    padded = F.pad(x, (r, r, r, r))
    # (N, k^2, s*h, s*w) -> (N, k^2, h, s, w, s): the s*s output pixels that read source (i, j).
    weights = kernels.view(n, k_up * k_up, h, scale, w, scale)
    out = x.new_zeros(n, c, h, scale, w, scale)
    # One broadcast multiply-add per kernel tap, in place: no unfolded (N, C*k^2, h*w) copy and no
    # per-pixel matrix products; 7x faster than unfold + matmul at 256 x 100 x 152 on CPU
    # (tools/benchmark_upsamplers.py), and autograd keeps only views of ``padded`` and ``kernels``.
    for k in range(k_up * k_up):
        dy, dx = divmod(k, k_up)
        tap = padded.narrow(2, dy, h).narrow(3, dx, w).unsqueeze(3).unsqueeze(5)  # (N, C, h, 1, w, 1)
        out.addcmul_(tap, weights.select(1, k).unsqueeze(1))
    return out.view(n, c, h * scale, w * scale)


def reassemble_in_float32(x: torch.Tensor, kernels: torch.Tensor, k_up: int, scale: int) -> torch.Tensor:
    """:func:`carafe_reassemble` accumulated in float32 for a float16/bfloat16 ``x`` (its k_up^2
    taps summed in half precision carry several roundings of the result), returned in ``x``'s
    dtype; for a float32 (or float64) ``x`` exactly :func:`carafe_reassemble` (afigan/layers/precision.py)."""
    if not is_half(x):
        return carafe_reassemble(x, kernels, k_up, scale)
    with float32_island(x):
        return carafe_reassemble(x.float(), kernels.float(), k_up, scale).to(x.dtype)


class CARAFE(nn.Module):
    """CARAFE x2 upsampler (mmcv ``CARAFEPack`` form, ``up_group=1``, ``encoder_dilation=1``).

    channel compressor (1x1, C -> compressed_channels) -> content encoder (encoder_kernel x
    encoder_kernel, -> scale^2 * up_kernel^2) -> pixel shuffle -> softmax over each kernel ->
    :func:`carafe_reassemble`. Like CARAFEPack there is no output convolution, so at 256 channels
    with the defaults it has 256*64 + 64 + 64*100*9 + 100 = 74,148 parameters.

    Init as CARAFEPack: xavier-uniform (gain 1, zero bias), then the content encoder normal(std
    0.001) with zero bias, so a fresh CARAFE reassembles with nearly uniform kernels.

    Call: ``forward(x, output_size=None, guide=None)``; ``guide`` is ignored (not a guided kind).
    """

    guided = False
    # The reassembly accumulated in float32 for a half-precision x (reassemble_in_float32); False: in x's dtype.
    float32_island = True

    def __init__(self, channels: int, up_kernel: int = 5, encoder_kernel: int = 3, compressed_channels: int = 64):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"CARAFE channels must be a positive integer, got {channels!r}.")
        check_odd_kernel(up_kernel, "CARAFE up_kernel")
        check_odd_kernel(encoder_kernel, "CARAFE encoder_kernel")
        if isinstance(compressed_channels, bool) or not isinstance(compressed_channels, int) or compressed_channels < 1:
            raise ValueError(f"CARAFE compressed_channels must be a positive integer, got {compressed_channels!r}.")
        self.channels = channels
        self.scale = 2
        self.up_kernel = up_kernel
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(
            compressed_channels, self.scale**2 * up_kernel**2, encoder_kernel, padding=encoder_kernel // 2
        )
        for m in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised reassembly kernels (N, up_kernel^2, 2h, 2w) for x (N, C, h, w)."""
        mask = F.pixel_shuffle(self.content_encoder(self.channel_compressor(x)), self.scale)
        return F.softmax(mask, dim=1)

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; they would only warn
            check_feature_map(x, self.channels, type(self).__name__)
        reassemble = reassemble_in_float32 if self.float32_island else carafe_reassemble
        out = reassemble(x, self.kernels(x), self.up_kernel, self.scale)
        return resize_to(out, output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, up_kernel={self.up_kernel}"
