"""FPN with a pluggable x2 upsampler (the reference's FPN_AFIGAN).

Detectron2's FPN with one change: the top-down ``F.interpolate(..., scale_factor=2)`` becomes
``self.srf_module(prev, output_size=lateral.shape[-2:])``, one shared upsampler instance called
once per top-down step (3 times for p5 -> p2), or with ``MODEL.AFI.SHARED False`` one instance
per step, ``srf_modules[<level>]`` (guided kinds also get the lateral). Module names, output names, channels, strides
and ``size_divisibility`` are the stock ones, so Detectron2-zoo FPN weights load, and with
``MODEL.AFI.INTERP nearest`` the outputs equal the stock FPN's exactly.
"""

import math
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from .common import Upsamplers, attach_upsamplers, neck_upsampler_from_config, upsample_step

__all__ = ["AFIFPN", "fpn_kwargs_from_config", "top_down_levels"]


def fpn_kwargs_from_config(cfg, bottom_up: Backbone, top_block: Optional[nn.Module] = None) -> Dict:
    """Constructor arguments shared by AFIFPN and AFIPAFPN, from ``MODEL.FPN`` / ``MODEL.AFI``."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if not cfg.MODEL.FPN.IN_FEATURES or missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES must name outputs of the bottom-up network {sorted(bottom_up.output_shape())} "
            f"(set MODEL.RESNETS.OUT_FEATURES to match), got {list(cfg.MODEL.FPN.IN_FEATURES)}."
        )
    return dict(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool() if top_block is None else top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        upsampler=neck_upsampler_from_config(cfg, out_channels, top_down_levels(bottom_up, cfg.MODEL.FPN.IN_FEATURES)),
    )


def top_down_levels(bottom_up: Backbone, in_features: List[str]) -> List[str]:
    """Output names of the levels a top-down step produces (all but the coarsest), finest first."""
    return [f"p{int(math.log2(bottom_up.output_shape()[f].stride))}" for f in in_features][:-1]


class AFIFPN(FPN):
    """Detectron2 FPN whose top-down x2 upsampling is ``self.srf_module``.

    Args: those of :class:`detectron2.modeling.FPN`, plus ``upsampler``: an ``nn.Module``
    called as ``up(x, output_size)`` (see :func:`afigan.layers.build_upsampler`), or a mapping
    ``{level: module}`` with one per top-down level (``p2``..``p4`` for res2..res5); default a
    fresh shared AF interpolator. Input: the bottom-up network's input (N, 3, H, W); output: dict
    ``p2..p6`` of (N, out_channels, H / stride, W / stride).
    """

    @configurable
    def __init__(
        self,
        bottom_up,
        in_features,
        out_channels,
        norm="",
        top_block=None,
        fuse_type="sum",
        upsampler: Optional[Upsamplers] = None,
        square_pad=0,
    ):
        super().__init__(
            bottom_up,
            in_features,
            out_channels,
            norm=norm,
            top_block=top_block,
            fuse_type=fuse_type,
            square_pad=square_pad,
        )
        self.install_upsamplers(upsampler)

    def install_upsamplers(self, upsampler: Optional[Upsamplers]) -> None:
        """Set the neck's upsampler(s): one shared module, or ``{level: module}`` per top-down step."""
        self.step_levels = top_down_levels(self.bottom_up, self.in_features)
        attach_upsamplers(self, upsampler, self.step_levels, next(iter(self.output_shape().values())).channels)

    @classmethod
    def from_config(cls, cfg, bottom_up, top_block=None):
        return fpn_kwargs_from_config(cfg, bottom_up, top_block)

    def top_down(self, bottom_up_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Merged top-down maps T_i (before the output convs), highest resolution first."""
        prev = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        merged = [prev]
        for idx, lateral_conv in enumerate(self.lateral_convs):
            if idx == 0:
                continue
            lateral = lateral_conv(bottom_up_features[self.in_features[-idx - 1]])
            prev = lateral + upsample_step(self, prev, self.step_levels[-idx], lateral)
            if self._fuse_type == "avg":
                prev = prev / 2
            merged.insert(0, prev)
        return merged

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up_features = self.bottom_up(x)
        merged = self.top_down(bottom_up_features)
        results = [conv(t) for conv, t in zip(self.output_convs[::-1], merged)]
        return self.with_top_block(bottom_up_features, results)

    def with_top_block(
        self, bottom_up_features: Dict[str, torch.Tensor], results: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Append the top block's levels (e.g. P6) to ``results`` and name every output."""
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_in = bottom_up_features[self.top_block.in_feature]
            else:
                top_in = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_in))
        return dict(zip(self._out_features, results))
