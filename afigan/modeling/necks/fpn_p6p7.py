"""ResNet + AFIFPN with the extra coarse levels that dense heads use.

* ``build_fcos_resnet_fpn_sr_backbone``: P6/P7 made from P5 (``MODEL.FCOS.TOP_LEVELS``, as in
  AdelaiDet's / CenterMask2's ``build_fcos_resnet_fpn_backbone``), for FCOS and CenterMask.
* ``build_retinanet_resnet_fpn_sr_backbone``: P6/P7 made from C5, as Detectron2's
  ``build_retinanet_resnet_fpn_backbone``.

The top-down path keeps the shared upsampler ``srf_module`` of :class:`AFIFPN`, so a stage-2
interpolator loads into these backbones under the same keys as into Mask R-CNN's; with
``MODEL.AFI.INTERP nearest`` they equal the stock nearest-neighbour FPNs.
"""
import fvcore.nn.weight_init as weight_init
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .fpn import AFIFPN, fpn_kwargs_from_config

__all__ = ["LastLevelP6", "fcos_top_block", "build_fcos_resnet_fpn_sr_backbone",
           "build_retinanet_resnet_fpn_sr_backbone"]


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


def _fpn_with_top_block(cfg, bottom_up: Backbone, top_block) -> AFIFPN:
    kwargs = fpn_kwargs_from_config(cfg, bottom_up)
    kwargs["top_block"] = top_block  # None here means "no extra level", not AFIFPN's default P6 pool
    return AFIFPN(**kwargs)


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet (res3-res5) + AFIFPN + ``MODEL.FCOS.TOP_LEVELS`` levels from P5: p3..p7, strides 8..128."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return _fpn_with_top_block(cfg, bottom_up, fcos_top_block(cfg.MODEL.FCOS.TOP_LEVELS, cfg.MODEL.FPN.OUT_CHANNELS))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet + AFIFPN + P6/P7 from C5 (Detectron2's RetinaNet backbone): p3..p7, strides 8..128."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_channels = bottom_up.output_shape()["res5"].channels
    return _fpn_with_top_block(cfg, bottom_up, LastLevelP6P7(in_channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature="res5"))
