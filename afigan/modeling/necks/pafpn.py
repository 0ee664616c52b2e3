"""PAFPN with a pluggable x2 upsampler (the reference's PAFPN_AFIGAN).

Top-down pass as in :class:`AFIFPN` (same shared ``srf_module``, no output convs yet), then a
bottom-up path aggregation: ``M2 = T2``, ``M_i = T_i + ReLU(pafpn_downsample_i(M_{i-1}))``,
``N_i = pafpn_output_i(M_i)``; P6 = stride-2 subsampling of N5. The downsample conv reads the
pre-output aggregate M_{i-1}, as in the reference.
"""

import math
from typing import Dict

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from torch.nn import functional as F

from afigan.layers.shape import fit_to

from .fpn import AFIFPN, fpn_kwargs_from_config

__all__ = ["AFIPAFPN"]


class AFIPAFPN(AFIFPN):
    """Path-aggregation FPN; arguments as :class:`AFIFPN`. Modules: ``fpn_lateral{i}``,
    ``pafpn_output{i}``, ``pafpn_downsample{i}`` (i > first), ``srf_module``.

    Unlike FPN's ``output_convs`` (top level first, applied top-down), the path-aggregation convs
    run bottom-up, so they are ``path_output_convs`` / ``path_downsample_convs`` (highest
    resolution first) and the inherited ``output_convs`` attribute is removed."""

    @configurable
    def __init__(
        self,
        bottom_up,
        in_features,
        out_channels,
        norm="",
        top_block=None,
        fuse_type="sum",
        upsampler=None,
        square_pad=0,
    ):
        super().__init__(
            bottom_up,
            in_features,
            out_channels,
            norm=norm,
            top_block=top_block,
            fuse_type=fuse_type,
            upsampler=upsampler,
            square_pad=square_pad,
        )
        strides = [bottom_up.output_shape()[f].stride for f in in_features]
        stages = [int(math.log2(s)) for s in strides]
        use_bias = norm == ""
        # FPN registered fpn_output{i}; PAFPN's output convs carry their own names instead.
        for stage in stages:
            delattr(self, f"fpn_output{stage}")
        outputs, downs = [], []
        for i, stage in enumerate(stages):
            out = Conv2d(out_channels, out_channels, 3, 1, 1, bias=use_bias, norm=get_norm(norm, out_channels))
            weight_init.c2_xavier_fill(out)
            self.add_module(f"pafpn_output{stage}", out)
            outputs.append(out)
            if i > 0:
                down = Conv2d(out_channels, out_channels, 3, 2, 1, bias=use_bias, norm=get_norm(norm, out_channels))
                weight_init.c2_xavier_fill(down)
                self.add_module(f"pafpn_downsample{stage}", down)
                downs.append(down)
        del self.output_convs
        self.path_output_convs = outputs
        self.path_downsample_convs = downs

    @classmethod
    def from_config(cls, cfg, bottom_up, top_block=None):
        return fpn_kwargs_from_config(cfg, bottom_up, top_block)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up_features = self.bottom_up(x)
        merged = self.top_down(bottom_up_features)
        m = merged[0]
        results = [self.path_output_convs[0](m)]
        for t, down, out in zip(merged[1:], self.path_downsample_convs, self.path_output_convs[1:]):
            # fit_to: on inputs not divisible by the neck's stride the stride-2 conv can be one
            # pixel larger than the lateral; Detectron2's padding makes it a no-op otherwise.
            m = t + fit_to(F.relu(down(m)), t.shape[-2:])
            if self._fuse_type == "avg":
                m = m / 2
            results.append(out(m))
        return self.with_top_block(bottom_up_features, results)
