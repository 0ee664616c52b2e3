"""The AF interpolator (AFI-GAN's generator ``G``): a learned x2 feature upsampler.

Architecture: ``out = Conv_C(LReLU(DeConv(LReLU(Conv_B(RRDB(LReLU(Conv_A(x))))))))
+ bilinear_x2(x)``. The learned branch is a residual correction on top of bilinear
interpolation, and its Kaiming x0.1 initialisation makes a fresh interpolator behave almost
exactly like bilinear x2.

The module tree (``Generators.0.{0..4}``, ``RDBs``, ``conv1..conv5``) mirrors the reference
implementation so that its released checkpoints load with ``strict=True``.
"""

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .shape import check_feature_map, resize_to
from .state_dict import ClearStateDictErrors

__all__ = ["AFInterpolator", "ResidualDenseBlock", "ResidualInResidualDenseBlock"]


def _fill_in_place(x: torch.Tensor) -> bool:
    """Whether the dense blocks may fill one preallocated buffer: no autograd, a plain contiguous
    (NCHW) map and no tracing or export (which should record the plain graph)."""
    return (
        not torch.is_grad_enabled()
        and x.is_contiguous()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
    )


def _scaled_kaiming_(module: nn.Module, scale: float = 0.1) -> None:
    """Kaiming-normal (fan-in, gain sqrt(2)) times ``scale`` with zero bias, as in ESRGAN."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions: ``u + res_scale * conv5([u, c1..c4])``.

    (N, C, H, W) -> (N, C, H, W). ``conv1..conv4`` are (conv, LeakyReLU) pairs, ``conv5`` is a
    bare conv; no biases (reference layout).
    """

    def __init__(self, channels: int = 256, growth: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        for i in range(4):
            conv = nn.Conv2d(channels + i * growth, growth, 3, 1, 1, bias=False)
            setattr(self, f"conv{i + 1}", nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True)))
        self.conv5 = nn.Conv2d(channels + 4 * growth, channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fill_in_place(x):
            return self._forward_buffer(x)
        feats = [x]
        for i in range(4):
            feats.append(getattr(self, f"conv{i + 1}")(torch.cat(feats, 1)))
        # add(alpha=): one pass over the map instead of a multiply and an add
        return torch.add(x, self.conv5(torch.cat(feats, 1)), alpha=self.res_scale)

    def _forward_buffer(self, x: torch.Tensor) -> torch.Tensor:
        # Inference only: every conv's output is written into one preallocated (N, C + 4g, H, W)
        # buffer instead of four growing concatenations. Autograd cannot keep the slices a conv
        # read for its backward while later ones are written, and the buffer's channel slices are
        # strided in channels_last, where torch.cat measured faster (tools/benchmark_roofline.py).
        n, c, h, w = x.shape
        growth = self.conv1[0].out_channels
        buf = torch.empty(n, c + 4 * growth, h, w, dtype=x.dtype, device=x.device)
        buf[:, :c] = x
        for i in range(4):
            k = c + i * growth
            buf[:, k : k + growth] = getattr(self, f"conv{i + 1}")(buf[:, :k])
        return torch.add(x, self.conv5(buf), alpha=self.res_scale)


class ResidualInResidualDenseBlock(nn.Module):
    """``u + res_scale * RDB_n(...RDB_1(u))``; (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int = 256, num_blocks: int = 3, growth: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        self.RDBs = nn.Sequential(*[ResidualDenseBlock(channels, growth, res_scale) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.RDBs(x), alpha=self.res_scale)


def _conv_act(conv: nn.Module, act: bool = True) -> nn.Sequential:
    return nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True)) if act else nn.Sequential(conv)


class AFInterpolator(ClearStateDictErrors, nn.Module):
    """Learned x2 upsampler for FPN-style necks.

    Args:
        channels: feature channels (reference: 256).
        num_blocks: residual dense blocks inside the single RRDB (reference call sites: 3).
        growth: dense-block growth rate (32).
        res_scale: residual scale beta of the dense blocks and the RRDB (0.2).
        skip: the parallel x2 path the learned branch corrects: "bilinear" (reference),
            "nearest", or "none".
        init_scale: multiplier of the Kaiming init (0.1 in the reference).

    Call: ``forward(x, output_size=None, guide=None)`` (``guide`` is ignored: the common
    upsampler signature, see :mod:`afigan.layers.upsample`); x is (N, channels, h, w); the result is
    (N, channels, 2h, 2w), or (N, channels, H, W) when ``output_size=(H, W)`` is given, obtained
    by cropping/padding the x2 map at its bottom/right (top-left alignment, as Detectron2 pads).
    """

    guided = False

    def __init__(
        self,
        channels: int = 256,
        num_blocks: int = 3,
        growth: int = 32,
        res_scale: float = 0.2,
        skip: str = "bilinear",
        init_scale: float = 0.1,
    ):
        super().__init__()
        if skip not in ("bilinear", "nearest", "none"):
            raise ValueError(f"AFInterpolator skip must be 'bilinear', 'nearest' or 'none', got {skip!r}.")
        self.channels = channels
        self.skip = skip
        body = nn.Sequential(
            _conv_act(nn.Conv2d(channels, channels, 3, 1, 1)),
            ResidualInResidualDenseBlock(channels, num_blocks, growth, res_scale),
            _conv_act(nn.Conv2d(channels, channels, 3, 1, 1)),
            # k6/s2/p2 gives exactly 2h: (h - 1) * 2 - 4 + 6.
            _conv_act(nn.ConvTranspose2d(channels, channels, 6, 2, 2)),
            _conv_act(nn.Conv2d(channels, channels, 3, 1, 1), act=False),
        )
        # A one-element list: the reference's progressive-growing remnant, kept for key names.
        self.Generators = nn.ModuleList([body])
        _scaled_kaiming_(self, init_scale)

    def forward(
        self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None, guide: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        check_feature_map(x, self.channels, type(self).__name__)
        out = self.Generators[0](x)
        if self.skip != "none":
            mode = dict(mode="bilinear", align_corners=False) if self.skip == "bilinear" else dict(mode="nearest")
            out = out + F.interpolate(x, scale_factor=2.0, **mode)
        return resize_to(out, output_size, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, skip={self.skip!r}"
