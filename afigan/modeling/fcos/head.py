"""The FCOS head of AdelaiDet/CenterMask2 built on Detectron2's own ``FCOSHead``.

Detectron2's ``FCOSHead`` (a ``RetinaNetHead`` with a centerness branch on the box tower)
provides the towers, the predictors and their initialisation. This subclass adds what the
CenterMask2 head has and Detectron2's lacks: a learnable scale per level, towers of different
depths plus a shared tower (``NUM_CLS/BOX/SHARE_CONVS``), ReLU-or-exp distances and optional
deformable convs.
"""

from typing import List, Tuple

import torch
from detectron2.layers import ShapeSpec, get_norm
from detectron2.layers.batch_norm import CycleBatchNormList
from detectron2.modeling.meta_arch.fcos import FCOSHead
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d

__all__ = ["Scale", "DeformConv3x3", "FCOSScaledHead"]


class Scale(nn.Module):
    """Multiply by one learnable scalar (initially ``init_value``); any shape in, same shape out."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class DeformConv3x3(nn.Module):
    """3x3 deformable conv whose offsets come from a zero-initialised 3x3 conv, so it starts
    as a plain conv. (N, C_in, H, W) -> (N, C_out, H, W). torchvision's op runs on CPU too,
    unlike Detectron2's compiled one."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.offset = nn.Conv2d(in_channels, 18, kernel_size=3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.offset(x))


def _tower_norm(norm: str, channels: int, num_levels: int):
    # BN statistics differ per pyramid level; Detectron2's RetinaNetHead keeps one BN per level
    # (CycleBatchNormList), so the shared tower does the same.
    if norm in ("BN", "SyncBN"):
        return CycleBatchNormList(
            length=num_levels, bn_class=nn.BatchNorm2d if norm == "BN" else nn.SyncBatchNorm, num_features=channels
        )
    return get_norm(norm, channels)


class FCOSScaledHead(FCOSHead):
    """FCOS head with per-level scales, a shared tower and towers of any depth.

    Args:
        input_shape: one ShapeSpec per level (same channels C everywhere).
        num_classes: foreground classes K.
        num_cls_convs, num_box_convs, num_share_convs: conv+norm+ReLU layers per tower.
        norm: "" | "GN" | "BN" | "SyncBN" (per-level BN) | any Detectron2 norm name.
        prior_prob: initial foreground probability (classifier bias).
        use_scale: multiply the regression of level l by a learnable scalar.
        use_relu: distances = ReLU(x) (improved FCOS) or exp(x) (original FCOS).
        use_deformable: deformable convs in the box and shared towers (as CenterMask2).

    ``forward(features)`` takes L maps (N, C, Hl, Wl) and returns three lists of L tensors:
    class logits (N, K, Hl, Wl), non-negative distances l, t, r, b in units of the level's
    stride (N, 4, Hl, Wl), centerness logits (N, 1, Hl, Wl).
    """

    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        num_share_convs: int = 0,
        norm: str = "GN",
        prior_prob: float = 0.01,
        use_scale: bool = True,
        use_relu: bool = True,
        use_deformable: bool = False,
    ):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"The FCOS head needs the same number of channels on every input level, got {sorted(channels)}."
            )
        c = channels.pop()
        depth = max(num_cls_convs, num_box_convs, 1)
        norm = "" if norm in (None, "none") else norm
        # Detectron2 builds both towers with len(conv_dims) layers; build the deeper depth and
        # cut each tower back to its own (every layer is C -> C, so the cut is exact).
        super().__init__(
            input_shape=input_shape, conv_dims=[c] * depth, num_classes=num_classes, norm=norm, prior_prob=prior_prob
        )
        per_layer = 3 if norm else 2  # conv, [norm], ReLU
        self.cls_subnet = self.cls_subnet[: per_layer * num_cls_convs]
        self.bbox_subnet = self.bbox_subnet[: per_layer * num_box_convs]
        share = []
        for _ in range(num_share_convs):
            conv = nn.Conv2d(c, c, kernel_size=3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            share += [conv] + ([_tower_norm(norm, c, len(input_shape))] if norm else []) + [nn.ReLU()]
        self.share_subnet = nn.Sequential(*share)
        if use_deformable:
            for tower in (self.bbox_subnet, self.share_subnet):
                for i, layer in enumerate(tower):
                    if isinstance(layer, nn.Conv2d):
                        tower[i] = DeformConv3x3(c, c)
        self.scales = nn.ModuleList([Scale(1.0) for _ in input_shape]) if use_scale else None
        self.use_relu = use_relu
        self.num_classes = num_classes

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        if len(features) != self._num_features:
            raise ValueError(f"The FCOS head was built for {self._num_features} levels but got {len(features)}.")
        logits, bbox_reg, ctrness = [], [], []
        for level, feature in enumerate(features):
            feature = self.share_subnet(feature)
            logits.append(self.cls_score(self.cls_subnet(feature)))
            box_feature = self.bbox_subnet(feature)
            reg = self.bbox_pred(box_feature)
            if self.scales is not None:
                reg = self.scales[level](reg)
            bbox_reg.append(F.relu(reg) if self.use_relu else torch.exp(reg))
            ctrness.append(self.ctrness(box_feature))
        return logits, bbox_reg, ctrness
