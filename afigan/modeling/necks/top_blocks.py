"""Top blocks for the extra coarse levels that dense heads use: P6 alone, or P6/P7 from P5
(``MODEL.FCOS.TOP_LEVELS``, as in AdelaiDet's / CenterMask2's ``build_fcos_resnet_fpn_backbone``).
Detectron2's ``LastLevelMaxPool`` and ``LastLevelP6P7`` cover the other cases."""

import fvcore.nn.weight_init as weight_init
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from torch import nn

__all__ = ["LastLevelP6", "fcos_top_block"]


class LastLevelP6(nn.Module):
    """P6 = 3x3 stride-2 conv of ``in_feature``: (N, C_in, H, W) -> [(N, C_out, ceil(H/2), ceil(W/2))]."""

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 1
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)

    def forward(self, x):
        return [self.p6(x)]


def fcos_top_block(top_levels: int, channels: int):
    """The top block for ``MODEL.FCOS.TOP_LEVELS`` = 0 (none), 1 (P6) or 2 (P6, P7), fed by P5."""
    if top_levels == 2:
        return LastLevelP6P7(channels, channels, in_feature="p5")
    if top_levels == 1:
        return LastLevelP6(channels, channels, in_feature="p5")
    if top_levels == 0:
        return None
    raise ValueError(f"MODEL.FCOS.TOP_LEVELS must be 0, 1 or 2, got {top_levels}.")
