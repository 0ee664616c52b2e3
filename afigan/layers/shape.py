"""Input validation and size alignment shared by every upsampler.

Trace-safe: under ``torch.jit.trace`` (and the TorchScript-based ONNX exporter, which traces) a
size read from ``x.shape`` is a 0-dim tensor that the graph recomputes for every input, while
``int()`` of it or a Python ``if`` on it is frozen at the traced size. :func:`resize_to` and
:func:`fit_to` therefore crop and edge-pad by gathering rows and columns whose indices come from
those sizes (``arange(size).clamp(max=last)``) when tracing: the same values as slicing plus
replicate padding, for any input size. Eager calls keep the plain slicing and padding.
"""

from typing import Optional, Sequence

import torch
from torch.nn import functional as F

__all__ = ["check_feature_map", "resize_to", "crop_to_common", "fit_to"]


def check_feature_map(x: torch.Tensor, channels: Optional[int], who: str) -> None:
    """Raise ValueError unless ``x`` is a 4-D (N, channels, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a 4-D tensor of shape (N, {channels or 'C'}, H, W), got {shape}.")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{who} expects a 4-D tensor of shape (N, {channels}, H, W), got {tuple(x.shape)} "
            f"({x.shape[1]} channels instead of {channels})."
        )


def resize_to(out: torch.Tensor, output_size: Optional[Sequence[int]], in_size: Sequence[int]) -> torch.Tensor:
    """Crop or pad a x2-upsampled map at its bottom/right to ``output_size`` = (H, W).

    Detectron2 pads images at the bottom/right, so cutting or extending there keeps the
    upsampled map aligned with the lateral feature it is added to. Padding repeats the edge.
    Allowed sizes are 1 .. 2 * input + 1 in each dimension (an odd lateral of a floor-halved
    coarser map is at most one pixel larger than x2).
    """
    if output_size is None:
        return out
    if torch.jit.is_tracing():  # no Python ints or checks: they would freeze the traced size
        return _fit_traced(out, output_size)
    size = tuple(int(s) for s in output_size)
    h, w = int(in_size[0]), int(in_size[1])
    if len(size) != 2 or not (1 <= size[0] <= 2 * h + 1 and 1 <= size[1] <= 2 * w + 1):
        raise ValueError(
            f"output_size must be (H, W) with 1 <= H <= {2 * h + 1} and 1 <= W <= {2 * w + 1} "
            f"for a {h}x{w} input, got {tuple(output_size)}."
        )
    out = out[..., : size[0], : size[1]]
    pad_h, pad_w = size[0] - out.shape[-2], size[1] - out.shape[-1]
    if pad_h or pad_w:
        out = F.pad(out, (0, pad_w, 0, pad_h), mode="replicate")
    return out


def crop_to_common(a: torch.Tensor, b: torch.Tensor):
    """Cut two (..., H, W) maps to their common top-left min(H) x min(W) window."""
    h = min(a.shape[-2], b.shape[-2])
    w = min(a.shape[-1], b.shape[-1])
    return a[..., :h, :w], b[..., :h, :w]


def fit_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or edge-pad (..., H, W) at the bottom/right to ``size`` (no bound on the change)."""
    if torch.jit.is_tracing():
        return _fit_traced(x, size)
    x = x[..., : size[0], : size[1]]
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


def _fit_traced(x: torch.Tensor, size: Sequence) -> torch.Tensor:
    """:func:`fit_to` for tracing: row i of the result is row min(i, H - 1) of ``x`` (likewise
    columns), so rows past the end repeat the last one (replicate padding) and rows past ``size``
    are dropped (cropping). ``size`` and ``x``'s own sizes stay traced values (Range, Min and
    Gather in ONNX), so the graph fits every input size, not just the traced one."""
    h, w = x.shape[-2], x.shape[-1]
    rows = torch.arange(size[0], device=x.device).clamp(max=h - 1)
    cols = torch.arange(size[1], device=x.device).clamp(max=w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)
