"""DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023).

Point sampling with learned offsets: every output pixel reads the input, by bilinear
``grid_sample``, at its bilinear-x2 source position plus a predicted offset. The mathematics
follow the authors' public ``tiny-smart/dysample`` (``dysample.py``), including its parameter and
buffer names (``offset``, ``scope``, ``init_pos``), so its state dicts load unchanged.
"""

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .precision import float32_island, is_half
from .shape import check_feature_map, resize_to

__all__ = ["DySample"]


class DySample(nn.Module):
    """DySample x2 upsampler.

    Args:
        channels: feature channels C.
        style: "lp" (1x1 offset conv on the low-res map, C -> 2*groups*4, then pixel shuffle) or
            "pl" (pixel shuffle first, then a 1x1 conv C/4 -> 2*groups on the high-res map);
            "pl" needs C divisible by 4, as in the authors' code.
        groups: channel groups with their own sampling offsets; C must be divisible by it.
        dyscope: dynamic scope, ``offset * 0.5 * sigmoid(scope_conv(x))`` (DySample+), instead of
            the static ``offset * 0.25``.

    Init as the authors': offset conv normal(std 0.001) with zero bias; scope conv (no bias) zero,
    so the dynamic scope starts at 0.5 * sigmoid(0) = 0.25, the static factor. With a zero offset
    conv the output is exactly ``F.interpolate(x, scale_factor=2, mode="bilinear",
    align_corners=False)``: ``padding_mode="border"`` clamps the sub-pixel positions that fall
    outside the map onto its edge, exactly as bilinear interpolation clamps its source index.

    Call: ``forward(x, output_size=None, guide=None)``; ``guide`` is ignored (not a guided kind).
    Parameters at 256 channels: lp/g4 8,224; lp/g4 + dyscope 16,416.
    """

    guided = False
    # Sampling positions and grid_sample in float32 for a float16/bfloat16 x, the result cast back
    # (afigan/layers/precision.py); False: all in x's dtype, as the authors' code.
    float32_island = True

    def __init__(self, channels: int, style: str = "lp", groups: int = 4, dyscope: bool = False):
        super().__init__()
        scale = 2
        if style not in ("lp", "pl"):
            raise ValueError(f"DySample style must be 'lp' or 'pl', got {style!r}.")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"DySample groups must be a positive integer, got {groups!r}.")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1 or channels % groups:
            raise ValueError(f"DySample channels must be a positive multiple of groups={groups}, got {channels!r}.")
        if style == "pl" and channels % scale**2:
            raise ValueError(f"DySample channels must be a multiple of {scale**2} for style 'pl', got {channels}.")
        if not isinstance(dyscope, bool):
            raise ValueError(f"DySample dyscope must be True or False, got {dyscope!r}.")
        self.channels = channels
        self.scale = scale
        self.style = style
        self.groups = groups
        in_ch = channels // scale**2 if style == "pl" else channels
        out_ch = 2 * groups if style == "pl" else 2 * groups * scale**2
        self.offset = nn.Conv2d(in_ch, out_ch, 1)
        nn.init.normal_(self.offset.weight, std=0.001)
        nn.init.zeros_(self.offset.bias)
        if dyscope:
            self.scope = nn.Conv2d(in_ch, out_ch, 1, bias=False)
            nn.init.zeros_(self.scope.weight)
        else:
            self.scope = None
        self.register_buffer("init_pos", self._init_pos())

    def _init_pos(self) -> torch.Tensor:
        """(1, 2*groups*s^2, 1, 1): (x, y) offset of sub-pixel (a, b) from its source pixel centre.

        Channel (comp, g, a, b) -> comp*groups*s^2 + g*s^2 + a*s + b; comp 0 is x and depends on
        the column b, comp 1 is y and depends on the row a. For s = 2 the values are +-0.25.
        """
        s = self.scale
        h = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) / s
        x_off = h.view(1, s).expand(s, s)  # [a, b] -> h[b]
        y_off = h.view(s, 1).expand(s, s)  # [a, b] -> h[a]
        pos = torch.stack([x_off, y_off]).unsqueeze(1).expand(2, self.groups, s, s)
        return pos.reshape(1, -1, 1, 1).clone()

    def _offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Low-res offsets (N, 2*groups*s^2, h, w) in input-pixel units."""
        if self.style == "pl":
            x_ = F.pixel_shuffle(x, self.scale)
            off = self.offset(x_)
            if self.scope is not None:
                off = off * self.scope(x_).sigmoid()
            off = F.pixel_unshuffle(off, self.scale)
        else:
            off = self.offset(x)
            if self.scope is not None:
                off = off * self.scope(x).sigmoid()
        return off * (0.5 if self.scope is not None else 0.25) + self.init_pos

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a traced graph keeps no Python checks; they would only warn
            check_feature_map(x, self.channels, type(self).__name__)
        n, _, h, w = x.shape
        s, g = self.scale, self.groups
        off = self._offsets(x).view(n, 2, g * s * s, h, w)
        # In half precision a position near column 300 is 1/4 px (float16) or 2 px (bfloat16) coarse.
        island = self.float32_island and is_half(x)
        src, off = (x.float(), off.float()) if island else (x, off)
        # Source pixel centres (j + 0.5, i + 0.5) plus offsets, normalised for grid_sample with
        # align_corners=False (-1 and 1 are the outer edges of the map).
        xs = (torch.arange(w, dtype=src.dtype, device=x.device) + 0.5).view(1, 1, 1, 1, w)
        ys = (torch.arange(h, dtype=src.dtype, device=x.device) + 0.5).view(1, 1, 1, h, 1)
        gx = 2 * (xs + off[:, 0:1]) / w - 1
        gy = 2 * (ys + off[:, 1:2]) / h - 1
        grid = torch.cat([gx, gy], 1).reshape(n, 2 * g * s * s, h, w)
        # 4-D pixel shuffle (ONNX DepthToSpace is 4-D): (N, 2*g*s^2, h, w) -> (N, 2*g, s*h, s*w).
        grid = F.pixel_shuffle(grid, s).view(n, 2, g, s * h, s * w)
        grid = grid.permute(0, 2, 3, 4, 1).reshape(n * g, s * h, s * w, 2)
        with float32_island(x) if island else contextlib.nullcontext():
            out = F.grid_sample(
                src.reshape(n * g, -1, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False
            ).view(n, -1, s * h, s * w)
        return resize_to(out.to(x.dtype) if island else out, output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, style={self.style!r}, groups={self.groups}, dyscope={self.scope is not None}"
