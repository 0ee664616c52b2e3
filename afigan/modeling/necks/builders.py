"""Every registered bottom-up network x afigan neck builder (reference names where it had one).

Each puts one of afigan's necks, with the shared upsampler ``srf_module`` of ``MODEL.AFI.INTERP``,
on a bottom-up network from :mod:`afigan.modeling.backbones` or Detectron2. Necks depend on
backbones, never the other way round.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..backbones.resnest import build_resnest_backbone
from ..backbones.swin import build_swint_backbone
from .bifpn import AFIBiFPN
from .fpn import AFIFPN, fpn_kwargs_from_config
from .pafpn import AFIPAFPN
from .top_blocks import fcos_top_block

__all__ = [
    "build_resnet_fpn_sr_backbone",
    "build_resnet_pafpn_sr_backbone",
    "build_resnet_bifpn_sr_backbone",
    "build_resnest_fpn_sr_backbone",
    "build_resnest_pafpn_sr_backbone",
    "build_swint_bifpn_sr_backbone",
    "build_fcos_resnet_fpn_sr_backbone",
    "build_retinanet_resnet_fpn_sr_backbone",
]


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet + FPN with the shared upsampler: p2..p6, strides 4..64."""
    return AFIFPN(cfg, bottom_up=build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnet_pafpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet + PAFPN with the shared upsampler: p2..p6, strides 4..64."""
    return AFIPAFPN(cfg, bottom_up=build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnet_bifpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet + BiFPN over ``MODEL.BIFPN.IN_FEATURES`` (e.g. res3..res5; FCOS/CenterMask rows): p3..p7."""
    return AFIBiFPN(cfg, bottom_up=build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnest_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNeSt + FPN with the shared upsampler: p2..p6, strides 4..64."""
    return AFIFPN(cfg, bottom_up=build_resnest_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnest_pafpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNeSt + PAFPN with the shared upsampler: p2..p6, strides 4..64."""
    return AFIPAFPN(cfg, bottom_up=build_resnest_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_swint_bifpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Swin Transformer (``MODEL.SWINT.*``) + BiFPN (``MODEL.BIFPN.*``): p3..p7."""
    return AFIBiFPN(cfg, bottom_up=build_swint_backbone(cfg, input_shape))


def _fpn_with_top_block(cfg, bottom_up: Backbone, top_block) -> AFIFPN:
    kwargs = fpn_kwargs_from_config(cfg, bottom_up)
    kwargs["top_block"] = top_block  # None here means "no extra level", not AFIFPN's default P6 pool
    return AFIFPN(**kwargs)


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet (res3-res5) + FPN + ``MODEL.FCOS.TOP_LEVELS`` levels from P5 (AdelaiDet's
    ``build_fcos_resnet_fpn_backbone``): p3..p7, strides 8..128."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return _fpn_with_top_block(cfg, bottom_up, fcos_top_block(cfg.MODEL.FCOS.TOP_LEVELS, cfg.MODEL.FPN.OUT_CHANNELS))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_sr_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet + FPN + P6/P7 from C5 (Detectron2's ``build_retinanet_resnet_fpn_backbone``): p3..p7."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_channels = bottom_up.output_shape()["res5"].channels
    return _fpn_with_top_block(
        cfg, bottom_up, LastLevelP6P7(in_channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature="res5")
    )
