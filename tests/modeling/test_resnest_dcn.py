"""Deformable ResNeSt (MODEL.RESNETS.DEFORM_ON_PER_STAGE / DEFORM_MODULATED / DEFORM_NUM_GROUPS):
the torchvision-based deformable conv against the plain conv, the reference's modulation
convention, blocks that start as the plain blocks, the reference's key names around the released
S-101 listing, exact parameter counts and a CPU forward/backward of a whole backbone."""

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from conftest import load_listing  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import afigan  # noqa: E402,F401  (registers the builders)
from afigan.modeling.backbones.resnest import (  # noqa: E402
    ResNeStBottleneckBlock,
    ResNeStDeformBottleneckBlock,
    build_resnest_backbone,
)
from afigan.modeling.backbones.resnest_dcn import DeformConv, DeformSplitAttn, split_offset_mask  # noqa: E402

PREFIX = "backbone.bottom_up."


def plain_conv(conv: DeformConv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize(
    "groups, stride, dilation, offset_groups", [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 2, 2), (1, 2, 2, 4)]
)
def test_zero_offsets_are_the_plain_conv(groups, stride, dilation, offset_groups):
    conv = DeformConv(8, 12, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=True)
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
        x = torch.randn(2, 8, 11, 9)
        ref = plain_conv(conv, x)
        zero = torch.zeros(2, 2 * offset_groups * 9, *ref.shape[-2:])
        torch.testing.assert_close(conv(x, zero), ref, rtol=1e-5, atol=1e-5)
        # A mask of ones is no modulation; a constant mask c scales the (bias-free) sum by c.
        ones = torch.ones(2, offset_groups * 9, *ref.shape[-2:])
        torch.testing.assert_close(conv(x, zero, ones), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            conv(x, zero, 0.25 * ones) - conv.bias.view(1, -1, 1, 1),
            0.25 * (ref - conv.bias.view(1, -1, 1, 1)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_offsets_are_dy_dx_per_tap():
    # Offset (dy, dx) = (1, 0) at every tap samples one row lower: the plain conv of the input moved
    # up by one row, except in row 0 (whose top taps read row 0 instead of the zero padding).
    # Swapped channels would move it sideways.
    conv = DeformConv(3, 4, 3, padding=1)
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 10)
        offset = torch.zeros(1, 18, 8, 10)
        offset[:, 0::2] = 1.0
        moved = plain_conv(conv, torch.cat([x[:, :, 1:], torch.zeros(1, 3, 1, 10)], dim=2))
        torch.testing.assert_close(conv(x, offset)[:, :, 1:], moved[:, :, 1:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(conv(x, offset), plain_conv(conv, x), atol=1e-3)


def test_modulation_follows_the_reference():
    # (a, b, m) chunks: offset = cat(a, b), mask = sigmoid(m) (0.5 from a zero offset conv).
    raw = torch.arange(27.0).view(1, 27, 1, 1)
    offset, mask = split_offset_mask(raw, True)
    assert offset.flatten().tolist() == list(range(18))
    torch.testing.assert_close(mask, torch.arange(18.0, 27.0).view(1, 9, 1, 1).sigmoid())
    plain = raw[:, :18]
    offset, mask = split_offset_mask(plain, False)
    assert offset is plain and mask is None


def _pair(radix: int, modulated: bool = False, num_groups: int = 1, norm: str = "BN", stride: int = 2):
    """A plain block and a deformable one with the plain one's weights (its offset conv stays zero)."""
    kw = dict(
        bottleneck_channels=16,
        stride=stride,
        num_groups=num_groups,
        norm=norm,
        radix=radix,
        avd=radix > 1,
        avg_down=radix > 1,
    )
    plain = ResNeStBottleneckBlock(32, 64, **kw)
    deform = ResNeStDeformBottleneckBlock(32, 64, deform_modulated=modulated, deform_num_groups=2, **kw)
    missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["conv2_offset.bias", "conv2_offset.weight"] and unexpected == []
    return plain.eval(), deform.eval()


@pytest.mark.parametrize("radix, num_groups, stride", [(1, 1, 2), (1, 2, 1), (2, 1, 2), (2, 2, 1)])
def test_deformable_block_starts_as_the_plain_block(radix, num_groups, stride):
    plain, deform = _pair(radix, num_groups=num_groups, stride=stride)
    assert isinstance(deform.conv2, DeformSplitAttn if radix > 1 else DeformConv)
    with torch.no_grad():
        x = torch.randn(2, 32, 10, 12)
        torch.testing.assert_close(deform(x), plain(x), rtol=1e-4, atol=1e-5)
        deform.conv2_offset.bias.fill_(0.3)  # a real deformation changes the output
        assert not torch.allclose(deform(x), plain(x), atol=1e-3)


@pytest.mark.parametrize("radix", [1, 2])
def test_modulated_block_starts_at_half_the_plain_branch(radix):
    # No norm, so the branch conv's halving by sigmoid(0) = 0.5 shows unchanged (radix 1); the
    # split attention's ReLU is positively homogeneous, its softmax sees the halved GAP (radix 2).
    plain, deform = _pair(radix, modulated=True, norm="")
    with torch.no_grad():
        x = F.relu(deform.conv1(torch.randn(2, 32, 9, 9)))
        if radix == 1:
            torch.testing.assert_close(deform._conv2(x), 0.5 * plain._conv2(x), rtol=1e-4, atol=1e-5)
        else:
            branch = deform.conv2.conv
            zero = torch.zeros(2, 36, 9, 9)
            torch.testing.assert_close(
                branch(x, zero, torch.full((2, 18, 9, 9), 0.5)), 0.5 * plain.conv2.conv(x), rtol=1e-4, atol=1e-5
            )
            assert not torch.allclose(deform._conv2(x), plain._conv2(x), atol=1e-4)


def test_offset_conv_learns():
    _, deform = _pair(2)
    deform.train()
    deform(torch.randn(2, 32, 10, 12)).square().mean().backward()
    assert deform.conv2_offset.weight.grad.abs().sum() > 0 and deform.conv2_offset.bias.grad.abs().sum() > 0


def s101_cfg(*overrides):
    cfg = make_cfg("inference/AFI-GAN_cascade_mask_rcnn_ResNeSt101_PAFPN.yaml", *overrides)
    cfg.MODEL.BACKBONE.NAME = "build_resnest_backbone"  # the bottom-up network alone
    return cfg


def offset_keys(blocks_per_stage=(4, 23, 3)):
    return {
        f"res{s}.{i}.conv2_offset.{p}"
        for s, n in zip((3, 4, 5), blocks_per_stage)
        for i in range(n)
        for p in ("weight", "bias")
    }


@pytest.mark.parametrize(
    "modulated, groups, extra", [(False, 1, 1_286_172), (True, 1, 1_929_258), (True, 4, 1_931_688)]
)
def test_dcn_s101_keys_are_the_released_listing_plus_offset_convs(modulated, groups, extra):
    # DEFORM_ON_PER_STAGE [F, T, T, T]: deformable res3-res5 ("dconv_c3-c5"), with the reference's
    # names: every tensor of the released S-101 model's bottom-up network, same shape, plus conv2_offset.
    listing = load_listing("cascade_mask_rcnn_ResNeSt101_PAFPN_afi.json")["state_dict_shapes"]
    ref = {k[len(PREFIX) :]: s for k, s in listing.items() if k.startswith(PREFIX)}
    plain = build_backbone(s101_cfg())
    cfg = s101_cfg(
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        [False, True, True, True],
        "MODEL.RESNETS.DEFORM_MODULATED",
        modulated,
        "MODEL.RESNETS.DEFORM_NUM_GROUPS",
        groups,
    )
    model = build_backbone(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) - set(ref) == offset_keys() and set(ref) - set(ours) == set()
    assert {k: s for k, s in ours.items() if k in ref and s != ref[k]} == {}
    taps = (27 if modulated else 18) * groups
    assert ours["res4.7.conv2_offset.weight"] == [taps, 256 // groups, 3, 3] and ours["res5.2.conv2_offset.bias"] == [
        taps
    ]
    # Exact counts: the offset convs are all that is added (hand-computed totals over 30 blocks).
    count = sum(p.numel() for p in model.parameters())
    assert count - sum(p.numel() for p in plain.parameters()) == extra
    assert sum(p.numel() for k, p in model.named_parameters() if "conv2_offset" in k) == extra
    # FREEZE_AT 2 freezes res2 only: the deformable stages train.
    assert isinstance(model.res2[0].conv2.bn0, FrozenBatchNorm2d) and model.res3[0].conv2_offset.weight.requires_grad
    assert type(model.res2[0]) is ResNeStBottleneckBlock
    assert all(type(b) is ResNeStDeformBottleneckBlock for s in (model.res3, model.res4, model.res5) for b in s)


def small_cfg(*overrides):
    """ResNeSt-50 at toy widths (16 per group, res2 64 channels), BN, nothing frozen."""
    return make_cfg(
        None,
        "MODEL.BACKBONE.NAME",
        "build_resnest_backbone",
        "MODEL.RESNETS.DEPTH",
        50,
        "MODEL.RESNETS.RADIX",
        2,
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        16,
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        64,
        "MODEL.RESNETS.NORM",
        "BN",
        "MODEL.BACKBONE.FREEZE_AT",
        0,
        "MODEL.RESNETS.OUT_FEATURES",
        ["res2", "res3", "res4", "res5"],
        *overrides,
    )


@pytest.mark.parametrize("radix, modulated, groups", [(2, False, 1), (2, True, 2), (1, True, 1)])
def test_dcn_resnest_runs_forward_and_backward_on_cpu(radix, modulated, groups):
    cfg = small_cfg(
        "MODEL.RESNETS.RADIX",
        radix,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        [True, False, True, True],
        "MODEL.RESNETS.DEFORM_MODULATED",
        modulated,
        "MODEL.RESNETS.DEFORM_NUM_GROUPS",
        groups,
    )
    model = build_backbone(cfg)
    assert [type(s[0]).__name__ for s in (model.res2, model.res3, model.res4, model.res5)] == [
        "ResNeStDeformBottleneckBlock",
        "ResNeStBottleneckBlock",
        "ResNeStDeformBottleneckBlock",
        "ResNeStDeformBottleneckBlock",
    ]
    out = model(torch.randn(2, 3, 64, 48))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 64, 16, 12),
        "res3": (2, 128, 8, 6),
        "res4": (2, 256, 4, 3),
        "res5": (2, 512, 2, 2),
    }
    sum(v.mean() for v in out.values()).backward()
    grads = [b.conv2_offset.weight.grad for b in model.res4]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_deform_settings_are_one_sentence():
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one flag per stage"):
        build_resnest_backbone(small_cfg("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [True, True]), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.DEFORM_NUM_GROUPS must be >= 1"):
        build_resnest_backbone(small_cfg("MODEL.RESNETS.DEFORM_NUM_GROUPS", 0), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match=r"DEFORM_NUM_GROUPS 5 must be >= 1 and divide the block's group width 16"):
        build_resnest_backbone(
            small_cfg(
                "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [True, False, False, False], "MODEL.RESNETS.DEFORM_NUM_GROUPS", 5
            ),
            ShapeSpec(channels=3),
        )
