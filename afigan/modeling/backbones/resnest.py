"""ResNeSt as a Detectron2 backbone (spec §12.1), on Detectron2's modern ``ResNet`` / ``CNNBlockBase``.

A port of the detectron2-ResNeSt project used by the reference: deep stem, split-attention
bottlenecks, AVD and the average-pool ("ResNet-D") shortcut. Module names equal the reference's,
so its checkpoints (e.g. the released cascade ResNeSt-101 models) load with no missing and no
unexpected keys. Dropped from the reference: DropBlock/RFConv branches (dead code) and the broken
R18/R34 path (ValueError). The deformable blocks (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``,
``DEFORM_MODULATED``, ``DEFORM_NUM_GROUPS``) run on torchvision's deformable conv
(:mod:`afigan.modeling.backbones.resnest_dcn`), so on CPU too.

Builders in Detectron2's backbone registry: ``build_resnest_backbone`` and, with the AF
interpolator necks, ``build_resnest_fpn_sr_backbone`` / ``build_resnest_pafpn_sr_backbone``.
"""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, ResNet
from torch import nn
from torch.nn import functional as F

from .resnest_dcn import DeformConv, DeformSplitAttn, offset_channels, split_offset_mask

__all__ = [
    "ResNeStStem",
    "ResNeStBottleneckBlock",
    "ResNeStDeformBottleneckBlock",
    "build_resnest_backbone",
    "RESNEST_BLOCKS_PER_STAGE",
]

# Blocks in res2..res5 per depth. 152 comes with the reference's table; 18/34 are refused below.
RESNEST_BLOCKS_PER_STAGE = {
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
    269: [3, 30, 48, 8],
}
_STAGE_OF = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}


def stem_width_for_depth(depth: int) -> int:
    """Deep-stem width w (output channels 2w): 32 for ResNeSt-50, 64 for deeper ones."""
    return 32 if depth == 50 else 64


class ResNeStStem(CNNBlockBase):
    """ResNeSt stem, stride 4.

    Deep stem (``deep_stem=True``): ``conv1_1`` 3x3/2 (C_in -> w), ``conv1_2`` 3x3 (w -> w),
    ``conv1_3`` 3x3 (w -> 2w), each with norm + ReLU, then max-pool 3x3/2. Otherwise Detectron2's
    7x7/2 ``conv1`` (C_in -> out_channels) + max-pool. Input (N, C_in, H, W) ->
    (N, 2w or out_channels, ceil(H/4), ceil(W/4)).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 64,
        norm: str = "BN",
        deep_stem: bool = False,
        stem_width: int = 32,
    ):
        stem_out = 2 * stem_width if deep_stem else out_channels
        super().__init__(in_channels, stem_out, 4)
        self.deep_stem = deep_stem
        if deep_stem:
            widths = [(in_channels, stem_width, 2), (stem_width, stem_width, 1), (stem_width, stem_out, 1)]
            self._conv_names = ("conv1_1", "conv1_2", "conv1_3")
            for name, (cin, cout, stride) in zip(self._conv_names, widths):
                conv = Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, norm=get_norm(norm, cout))
                weight_init.c2_msra_fill(conv)
                self.add_module(name, conv)
        else:
            self._conv_names = ("conv1",)
            self.conv1 = Conv2d(
                in_channels, out_channels, 7, stride=2, padding=3, bias=False, norm=get_norm(norm, out_channels)
            )
            weight_init.c2_msra_fill(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._conv_names:
            x = F.relu_(getattr(self, name)(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNeStBottleneckBlock(CNNBlockBase):
    """ResNeSt bottleneck: 1x1 -> split-attention (or grouped) 3x3 -> [AVD pool] -> 1x1, + shortcut.

    Args:
        in_channels, out_channels, stride: as Detectron2's ``BottleneckBlock``.
        bottleneck_channels: NUM_GROUPS * WIDTH_PER_GROUP of this stage (64, 128, ... for ResNeSt).
        num_groups: cardinality.
        bottleneck_width: group width = int(bottleneck_channels * bottleneck_width / 64) * num_groups
            (the reference's formula).
        radix: split-attention radix; 1 gives a plain grouped 3x3 conv (named ``conv2`` with
            ``conv2.norm``), > 1 timm's :class:`SplitAttn` (``conv2.conv``, ``conv2.bn0``, ...).
        avd: apply the block stride with a 3x3 average pool after conv2 instead of a strided conv.
            Then the stride lives only in that pool, whatever ``stride_in_1x1`` says (the reference
            would also stride conv1 and silently halve the resolution once more).
        avg_down: shortcut = AvgPool(stride, ceil) + 1x1 stride-1 conv ("ResNet-D") instead of a
            strided 1x1 conv. The pool has no parameters, so checkpoint keys stay ``shortcut.*``.
        norm, stride_in_1x1, dilation: as Detectron2's ``BottleneckBlock``.
    Input (N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
        avd: bool = False,
        avg_down: bool = False,
        radix: int = 2,
        bottleneck_width: int = 64,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.avd = avd and stride > 1
        self.radix = radix
        group_width = int(bottleneck_channels * (bottleneck_width / 64.0)) * num_groups

        self.shortcut_avgpool = None
        if in_channels != out_channels:
            short_stride = stride
            if avg_down and stride > 1:
                self.shortcut_avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                short_stride = 1
            self.shortcut = Conv2d(
                in_channels, out_channels, 1, stride=short_stride, bias=False, norm=get_norm(norm, out_channels)
            )
        else:
            self.shortcut = None

        if self.avd:
            stride_1x1 = stride_3x3 = 1
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
        else:
            stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels, group_width, 1, stride=stride_1x1, bias=False, norm=get_norm(norm, group_width)
        )
        self.conv2 = self._make_conv2(
            group_width, stride=stride_3x3, dilation=dilation, num_groups=num_groups, norm=norm, radix=radix
        )
        self.conv3 = Conv2d(group_width, out_channels, 1, bias=False, norm=get_norm(norm, out_channels))

        # The split-attention conv keeps PyTorch's default init, as in the reference.
        for layer in [self.conv1, self.conv3, self.shortcut] + ([self.conv2] if radix == 1 else []):
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    def _make_conv2(
        self, group_width: int, *, stride: int, dilation: int, num_groups: int, norm: str, radix: int
    ) -> nn.Module:
        """The 3x3 conv: timm's split attention for radix > 1, else a grouped conv with norm."""
        if radix > 1:
            # timm is imported only when a split-attention block is built: importing afigan stays cheap.
            from timm.layers import SplitAttn

            # timm calls norm_layer(channels, device=..., dtype=...). get_norm gives None for no norm (None/""),
            # where timm wants norm_layer=None (bn0/bn1 then parameter-free Identity, as in the reference).
            norm_layer = None if norm is None or norm == "" else (lambda channels, **_: get_norm(norm, channels))
            # fc1 width make_divisible(in * radix * rd_ratio, min 32, rd_divisor): with divisor 1 and this ratio
            # it is exactly the reference's max(in * radix // 4, 32) (timm's default rounds to multiples of 8).
            attn_width = max(group_width * radix // 4, 32)
            return SplitAttn(
                group_width,
                group_width,
                3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                groups=num_groups,
                bias=False,
                radix=radix,
                norm_layer=norm_layer,
                rd_ratio=attn_width / (group_width * radix),
                rd_divisor=1,
            )
        return Conv2d(
            group_width,
            group_width,
            3,
            stride=stride,
            padding=dilation,
            bias=False,
            groups=num_groups,
            dilation=dilation,
            norm=get_norm(norm, group_width),
        )

    def _conv2(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = self._conv2(out)
        if self.radix == 1:  # SplitAttn already ends with its attention-weighted (non-negative) sum
            out = F.relu_(out)
        if self.avd:
            out = self.avd_layer(out)
        out = self.conv3(out)
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.shortcut_avgpool is None else self.shortcut_avgpool(x))
        return F.relu_(out + shortcut)


class ResNeStDeformBottleneckBlock(ResNeStBottleneckBlock):
    """:class:`ResNeStBottleneckBlock` whose 3x3 conv is deformable (the reference's ``DeformBottleneckBlock``).

    ``conv2_offset``: a zero-initialised 3x3 conv (bias, ``deform_num_groups`` groups, conv2's
    stride and dilation) on conv1's output predicting the offsets, and with ``deform_modulated``
    the masks too (:func:`~afigan.modeling.backbones.resnest_dcn.split_offset_mask`: mask =
    sigmoid, so 0.5 at initialisation, as in the reference). ``conv2``: for radix 1 a deformable
    grouped conv with norm (``conv2.weight``, ``conv2.norm.*``), for radix > 1 a split attention
    with a deformable branch conv (``conv2.conv.weight``, ``conv2.bn0``, ...), named as the
    reference's. The offset conv reads the block's group width; the reference reads
    ``bottleneck_channels``, the same number unless ``BOTTLENECK_WIDTH`` != 64, where its blocks
    do not build. Other arguments and shapes: as the parent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
        **kwargs,
    ):
        # Read by _make_conv2 while the parent builds the block (plain attributes may be set
        # before nn.Module.__init__; modules and parameters may not).
        self._deform = (bool(deform_modulated), int(deform_num_groups))
        super().__init__(in_channels, out_channels, **kwargs)

    def _make_conv2(
        self, group_width: int, *, stride: int, dilation: int, num_groups: int, norm: str, radix: int
    ) -> nn.Module:
        modulated, groups = self._deform
        if groups < 1 or group_width % groups:
            raise ValueError(
                f"MODEL.RESNETS.DEFORM_NUM_GROUPS {groups} must be >= 1 and divide the block's "
                f"group width {group_width}; use a divisor of it (1 always works)."
            )
        self.conv2_offset = Conv2d(
            group_width,
            offset_channels(modulated, groups),
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=groups,
        )
        nn.init.zeros_(self.conv2_offset.weight)
        nn.init.zeros_(self.conv2_offset.bias)
        if radix > 1:
            return DeformSplitAttn(
                group_width, stride=stride, dilation=dilation, groups=num_groups, radix=radix, norm=norm
            )
        return DeformConv(
            group_width,
            group_width,
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
            norm=get_norm(norm, group_width),
        )

    def _conv2(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = split_offset_mask(self.conv2_offset(x), self._deform[0])
        return self.conv2(x, offset, mask)


def check_resnest_config(r) -> None:
    """Raise a one-sentence error for ``MODEL.RESNETS`` settings ResNeSt cannot build."""
    depth = r.DEPTH
    if depth in (18, 34):
        raise ValueError(
            f"MODEL.RESNETS.DEPTH {depth}: ResNeSt has no basic-block (R18/R34) variant; "
            f"use one of {sorted(RESNEST_BLOCKS_PER_STAGE)} or build_resnet_backbone."
        )
    if depth not in RESNEST_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(RESNEST_BLOCKS_PER_STAGE)} for ResNeSt, got {depth}."
        )
    if len(r.DEFORM_ON_PER_STAGE) != 4:
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one flag per stage res2..res5 (4), got "
            f"{list(r.DEFORM_ON_PER_STAGE)}."
        )
    if r.DEFORM_NUM_GROUPS < 1:
        raise ValueError(f"MODEL.RESNETS.DEFORM_NUM_GROUPS must be >= 1, got {r.DEFORM_NUM_GROUPS}.")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}.")
    if r.RADIX < 1:
        raise ValueError(f"MODEL.RESNETS.RADIX must be >= 1, got {r.RADIX}.")
    bad = [f for f in r.OUT_FEATURES if f not in _STAGE_OF and f != "stem"]
    if bad:
        raise ValueError(f"MODEL.RESNETS.OUT_FEATURES may only name stem/res2..res5, got {bad}.")


def make_resnest_stages(cfg, stem_out_channels: int) -> List[List[CNNBlockBase]]:
    """res2..res5 block lists from ``MODEL.RESNETS`` (only up to the last stage in OUT_FEATURES)."""
    r = cfg.MODEL.RESNETS
    check_resnest_config(r)
    depth = r.DEPTH
    last_stage = max([_STAGE_OF.get(f, 1) for f in r.OUT_FEATURES] + [2])

    radix = r.RADIX
    norm = r.NORM
    in_channels = stem_out_channels
    out_channels = r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, stage_idx in enumerate(range(2, last_stage + 1)):
        n = RESNEST_BLOCKS_PER_STAGE[depth][idx]
        dilation = r.RES5_DILATION if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        deform = (
            {"deform_modulated": r.DEFORM_MODULATED, "deform_num_groups": r.DEFORM_NUM_GROUPS}
            if r.DEFORM_ON_PER_STAGE[idx]
            else {}
        )
        stages.append(
            ResNet.make_stage(
                ResNeStDeformBottleneckBlock if deform else ResNeStBottleneckBlock,
                n,
                in_channels=in_channels,
                out_channels=out_channels,
                stride_per_block=[first_stride] + [1] * (n - 1),
                bottleneck_channels=bottleneck_channels,
                num_groups=r.NUM_GROUPS,
                norm=norm,
                stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation,
                avd=r.AVD or radix > 1,
                avg_down=r.AVG_DOWN or radix > 1,
                radix=radix,
                bottleneck_width=r.BOTTLENECK_WIDTH,
                **deform,
            )
        )
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return stages


@BACKBONE_REGISTRY.register()
def build_resnest_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNeSt from ``MODEL.RESNETS`` (+ RADIX, BOTTLENECK_WIDTH, DEEP_STEM, AVD, AVG_DOWN) as a
    Detectron2 :class:`ResNet`: outputs ``MODEL.RESNETS.OUT_FEATURES`` (res2..res5: strides 4..32,
    channels RES2_OUT_CHANNELS * 1, 2, 4, 8). RADIX > 1 forces the deep stem, AVD and avg-down.
    The stages flagged in DEFORM_ON_PER_STAGE are built of :class:`ResNeStDeformBottleneckBlock`
    (DEFORM_MODULATED, DEFORM_NUM_GROUPS).
    ``MODEL.BACKBONE.FREEZE_AT`` freezes the stem (>= 1) and res2.. (>= 2, ...) and turns their
    norms into FrozenBN."""
    r = cfg.MODEL.RESNETS
    check_resnest_config(r)  # before the stem, whose width depends on a valid depth
    stem = ResNeStStem(
        in_channels=input_shape.channels,
        out_channels=r.STEM_OUT_CHANNELS,
        norm=r.NORM,
        deep_stem=r.DEEP_STEM or r.RADIX > 1,
        stem_width=stem_width_for_depth(r.DEPTH),
    )
    stages = make_resnest_stages(cfg, stem.out_channels)
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
