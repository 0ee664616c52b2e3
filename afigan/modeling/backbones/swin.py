"""Swin Transformer as a Detectron2 ``Backbone`` (the reference's ``build_swint_backbone``, spec §12.2).

A thin subclass of Detectron2's :class:`detectron2.modeling.backbone.SwinTransformer` (a port of
the Swin detection code the reference used, so its parameter and buffer names -- ``patch_embed.proj``,
``layers.{i}.blocks.{j}.attn.relative_position_bias_table``, ``norm{i}``, ... -- and the reference
checkpoints load strictly). Added here: ``@configurable`` construction from ``MODEL.SWINT``, the
reference's output names ``stage2..stage5``, input/config checks, frozen stages that stay frozen,
and a forward that tracing keeps size-free (``swin_trace``).
"""

from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.swin import SwinTransformer as _D2SwinTransformer

from .swin_trace import swin_forward

__all__ = ["SwinTransformer", "build_swint_backbone"]


class SwinTransformer(_D2SwinTransformer):
    """Swin Transformer backbone.

    Input (N, in_chans, H, W), any H, W. Outputs ``stage{i+2}`` for the requested stages i in
    0..3: (N, E * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) -- i.e. stride patch_size * 2^i,
    channels E * 2^i -- each passed through its own LayerNorm ``norm{i}``.

    ``frozen_stages`` (Detectron2's FREEZE_AT, reference semantics): -1 freezes nothing; >= 0
    freezes the patch embedding; >= 1 also the absolute position embedding (APE); k >= 2 also
    Swin stages 0..k-2. Frozen parts get ``requires_grad=False`` and stay in eval mode.
    """

    @configurable
    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_size: int = 4,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        frozen_stages: int = -1,
        out_features: Sequence[str] = ("stage2", "stage3", "stage4", "stage5"),
    ):
        if len(depths) != len(num_heads):
            raise ValueError(
                f"MODEL.SWINT.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have equal length."
            )
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(
                    f"Swin stage width {embed_dim * 2**i} is not divisible by its {heads} attention heads."
                )
        names = [f"stage{i + 2}" for i in range(len(depths))]
        bad = [f for f in out_features if f not in names]
        if bad or not out_features:
            raise ValueError(
                f"MODEL.SWINT.OUT_FEATURES must be a non-empty subset of {names}, got {list(out_features)}."
            )
        super().__init__(
            pretrain_img_size=pretrain_img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            ape=ape,
            out_indices=tuple(sorted(names.index(f) for f in out_features)),
            frozen_stages=frozen_stages,
        )
        self._out_features = [names[i] for i in self.out_indices]
        self._out_feature_channels = {names[i]: self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {names[i]: patch_size * 2**i for i in self.out_indices}
        # Detectron2 0.6 stores 32 as `_size_devisibility` but its size_divisibility reads this name.
        self._size_divisibility = 32

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        s = cfg.MODEL.SWINT
        return dict(
            embed_dim=s.EMBED_DIM,
            depths=list(s.DEPTHS),
            num_heads=list(s.NUM_HEADS),
            window_size=s.WINDOW_SIZE,
            mlp_ratio=s.MLP_RATIO,
            drop_path_rate=s.DROP_PATH_RATE,
            ape=s.APE,
            in_chans=input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN),
            frozen_stages=cfg.MODEL.BACKBONE.FREEZE_AT,
            out_features=list(s.OUT_FEATURES),
        )

    def train(self, mode: bool = True):
        # Detectron2's port freezes only in __init__ (the original Swin re-froze in train()), so the
        # trainer's model.train() would turn stochastic depth and dropout back on in frozen stages.
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C, H, W) -> {stage{i+2}: (N, E * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))}."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}.")
        # Tracing: Detectron2's forward freezes the traced size (swin_trace explains where); the
        # size-free copy is used then, the port's own code otherwise.
        outs = swin_forward(self, x) if torch.jit.is_tracing() else super().forward(x)
        return {f"stage{int(k[1:]) + 2}": v for k, v in outs.items()}  # Detectron2 names p{i}


@BACKBONE_REGISTRY.register()
def build_swint_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Swin Transformer from ``MODEL.SWINT.*`` and ``MODEL.BACKBONE.FREEZE_AT`` (reference name)."""
    return SwinTransformer(cfg, input_shape)
