"""BiFPN with a pluggable, shared x2 upsampler (the reference's BiFPN_AFIGAN).

Two modes (``MODEL.BIFPN.MODE``):

* ``faithful`` (default, loads the released Swin-L checkpoint): 7 layers whatever
  ``FPN_REPEAT`` says; raw fusion weights (initialised to ones, no ReLU, no normalisation);
  layer 0 fuses the separate ``p4_skip`` / ``p5_skip`` projections in its bottom-up pass and
  layers 1..6 fuse the *initial* laterals c4, c5, p6, p7 there (O6 of docs/differences_from_reference.md).
* ``corrected`` (EfficientDet): ``FPN_REPEAT`` layers, fast normalised ReLU fusion, and layers
  1.. fuse their own inputs in the bottom-up pass. Same parameter names, so the same modules.

Each layer calls ``self.srf_module`` four times (top-down p7->p6->p5->p4->p3): one upsampler
instance shared by all layers (28 calls per forward in faithful mode); with ``MODEL.AFI.SHARED
False`` one instance per top-down level (``srf_modules.p3..p6``), shared by the layers. Outputs p3..p7,
``out_channels`` each, strides 8..128; ``size_divisibility`` is 128. Odd sizes work: upsampling
targets the lateral's size and pooled maps are cropped/edge-padded to the map they join.
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.backbone import Backbone
from torch import nn

from .bifpn_layers import BiFPNInput, SeparableConv2d, fuse, static_same_max_pool
from .common import Upsamplers, attach_upsamplers, neck_upsampler_from_config, upsample_step

__all__ = ["AFIBiFPN", "BIFPN_MODES"]

BIFPN_MODES = ("faithful", "corrected")
FAITHFUL_NUM_LAYERS = 7  # hard-coded in the reference; FPN_REPEAT is ignored there
_IN_STRIDES = (8, 16, 32)
_UP_LEVELS = (6, 5, 4, 3)  # top-down order: conv{l}_up, p{l}_w1
_DOWN_LEVELS = (4, 5, 6, 7)  # bottom-up order: conv{l}_down, p{l}_w2
BIFPN_STEP_LEVELS = [f"p{lvl}" for lvl in _UP_LEVELS]  # levels a top-down step produces (per-level upsampler keys)


class AFIBiFPN(Backbone):
    """BiFPN neck over a bottom-up network with stride-8/16/32 features.

    Args:
        bottom_up: Detectron2 backbone providing ``in_features``.
        in_features: three feature names with strides 8, 16, 32 (e.g. Swin stage3..5, res3..5).
        out_channels: BiFPN width C.
        norm: norm of the separable convs and the p6 block ("" = none; "BN", "SyncBN", "GN").
        mode: "faithful" or "corrected" (module docstring).
        num_layers: BiFPN layers; must be 7 (or None) in faithful mode.
        upsampler: module called ``up(x, output_size=(H, W))``, or ``{level: module}`` for the
            top-down levels p3..p6 (one per step, shared by the layers); default a fresh AF interpolator.

    Input (N, 3, H, W); output ``{p3..p7: (N, C, ~H/2^l, ~W/2^l)}`` (exactly H/2^l for H a
    multiple of 128).
    """

    @configurable
    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int,
        norm: str = "BN",
        mode: str = "faithful",
        num_layers: Optional[int] = None,
        upsampler: Optional[Upsamplers] = None,
    ):
        super().__init__()
        if mode not in BIFPN_MODES:
            raise ValueError(f"MODEL.BIFPN.MODE must be one of {BIFPN_MODES}, got {mode!r}.")
        if num_layers is None:
            num_layers = FAITHFUL_NUM_LAYERS
        if mode == "faithful" and num_layers != FAITHFUL_NUM_LAYERS:
            raise ValueError(
                f"The faithful BiFPN has {FAITHFUL_NUM_LAYERS} layers; use MODEL.BIFPN.MODE corrected "
                f"to build {num_layers}."
            )
        if num_layers < 1:
            raise ValueError(f"MODEL.BIFPN.FPN_REPEAT must be at least 1, got {num_layers}.")
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if len(in_features) != 3 or missing:
            raise ValueError(
                f"MODEL.BIFPN.IN_FEATURES must name three outputs of the bottom-up network "
                f"{sorted(shapes)}, got {list(in_features)}."
            )
        strides = tuple(shapes[f].stride for f in in_features)
        if strides != _IN_STRIDES:
            raise ValueError(
                f"MODEL.BIFPN.IN_FEATURES {list(in_features)} have strides {strides}; the BiFPN needs {_IN_STRIDES}."
            )
        self.mode, self.num_layers = mode, num_layers
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        # Fusion weights are direct parameters (reference names), registered first so the state
        # dict lists them first, as the reference's does.
        for k in range(num_layers):
            for lvl in _UP_LEVELS:
                self.register_parameter(f"BiFPNLayer_{k}_p{lvl}_w1", nn.Parameter(torch.ones(2)))
            for lvl in _DOWN_LEVELS:
                self.register_parameter(f"BiFPNLayer_{k}_p{lvl}_w2", nn.Parameter(torch.ones(3 if lvl < 7 else 2)))
        self.before_bifpn = BiFPNInput([shapes[f].channels for f in in_features], out_channels, norm)
        attach_upsamplers(self, upsampler, BIFPN_STEP_LEVELS, out_channels)
        for k in range(num_layers):
            for lvl in _UP_LEVELS:
                self.add_module(f"BiFPNLayer_{k}_conv{lvl}_up", SeparableConv2d(out_channels, out_channels, norm))
            for lvl in _DOWN_LEVELS:
                self.add_module(f"BiFPNLayer_{k}_conv{lvl}_down", SeparableConv2d(out_channels, out_channels, norm))
        self.act = nn.SiLU()  # swish
        self._out_features = [f"p{lvl}" for lvl in range(3, 8)]
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._out_feature_strides = {f"p{lvl}": 2**lvl for lvl in range(3, 8)}

    @classmethod
    def from_config(cls, cfg, bottom_up: Backbone):
        b = cfg.MODEL.BIFPN
        mode = b.MODE
        return dict(
            bottom_up=bottom_up,
            in_features=list(b.IN_FEATURES),
            out_channels=b.OUT_CHANNELS,
            norm=b.NORM,
            mode=mode,
            # Faithful mode ignores FPN_REPEAT, as the reference does (its Swin config says 7).
            num_layers=FAITHFUL_NUM_LAYERS if mode == "faithful" else b.FPN_REPEAT,
            upsampler=neck_upsampler_from_config(cfg, b.OUT_CHANNELS, BIFPN_STEP_LEVELS),
        )

    @property
    def size_divisibility(self) -> int:
        return 2**7  # stride of p7

    def _sep(self, k: int, name: str) -> nn.Module:
        return getattr(self, f"BiFPNLayer_{k}_{name}")

    def _node(self, k: int, conv: str, weight: str, inputs: List[torch.Tensor]) -> torch.Tensor:
        """One BiFPN node: separable conv of swish(weighted fusion of ``inputs``)."""
        fused = fuse(getattr(self, f"BiFPNLayer_{k}_{weight}"), inputs, normalised=self.mode == "corrected")
        return self._sep(k, conv)(self.act(fused))

    def bifpn_layer(self, k: int, a: List[torch.Tensor], s: List[torch.Tensor]) -> List[torch.Tensor]:
        """Layer ``k``: inputs ``a`` = [a3..a7], bottom-up skips ``s`` = [s4..s7] -> [u3, o4, o5, o6, o7]."""
        a3, a4, a5, a6, a7 = a
        s4, s5, s6, s7 = s
        u6 = self._node(k, "conv6_up", "p6_w1", [a6, upsample_step(self, a7, "p6", a6)])
        u5 = self._node(k, "conv5_up", "p5_w1", [a5, upsample_step(self, u6, "p5", a5)])
        u4 = self._node(k, "conv4_up", "p4_w1", [a4, upsample_step(self, u5, "p4", a4)])
        u3 = self._node(k, "conv3_up", "p3_w1", [a3, upsample_step(self, u4, "p3", a3)])
        o4 = self._node(k, "conv4_down", "p4_w2", [s4, u4, static_same_max_pool(u3, u4.shape[-2:])])
        o5 = self._node(k, "conv5_down", "p5_w2", [s5, u5, static_same_max_pool(o4, u5.shape[-2:])])
        o6 = self._node(k, "conv6_down", "p6_w2", [s6, u6, static_same_max_pool(o5, u6.shape[-2:])])
        o7 = self._node(k, "conv7_down", "p7_w2", [s7, static_same_max_pool(o6, s7.shape[-2:])])
        return [u3, o4, o5, o6, o7]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {p3..p7: (N, C, h_l, w_l)}."""
        feats = self.bottom_up(x)
        laterals, (c4_skip, c5_skip) = self.before_bifpn(*[feats[f] for f in self.in_features])
        a = laterals
        for k in range(self.num_layers):
            if k == 0:
                skips = [c4_skip, c5_skip] + laterals[3:]
            elif self.mode == "faithful":
                skips = laterals[1:]  # the initial laterals c4, c5, p6, p7 (reference, O6 in the module docstring)
            else:
                skips = a[1:]  # the layer's own inputs (EfficientDet)
            a = self.bifpn_layer(k, a, skips)
        return dict(zip(self._out_features, a))
