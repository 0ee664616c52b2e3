"""ResNeSt backbone: exact reference key/shape layout, checkpoint round trip, a small forward/backward,
split-attention properties and clear config errors."""

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from conftest import load_listing, random_state_dict  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import afigan  # noqa: E402,F401  (registers the builders)
from afigan.modeling.backbones.resnest import ResNeStBottleneckBlock, build_resnest_backbone  # noqa: E402

NECKS = ["FPN", "PAFPN"]


def inference_cfg(neck: str):
    return make_cfg(f"inference/AFI-GAN_cascade_mask_rcnn_ResNeSt101_{neck}.yaml")


@pytest.fixture(scope="module", params=NECKS)
def built(request):
    """(neck, listing, model) for one ResNeSt-101 inference config; built once per module."""
    neck = request.param
    listing = load_listing(f"cascade_mask_rcnn_ResNeSt101_{neck}_afi.json")
    return neck, listing, build_model(inference_cfg(neck))


def test_inference_config_matches_listing_exactly(built):
    neck, listing, model = built
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = listing["state_dict_shapes"]
    assert sorted(set(ref) - set(ours)) == [], f"{neck}: keys missing from our model"
    assert sorted(set(ours) - set(ref)) == [], f"{neck}: keys the reference does not have"
    assert {k: s for k, s in ours.items() if s != ref[k]} == {}
    n_elem = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n_elem == listing["elements_excluding_num_batches_tracked"]


def test_reference_checkpoint_round_trip(built):
    _, listing, model = built
    sd = random_state_dict(listing, seed=1)
    result = model.load_state_dict(sd, strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    after = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(after[k], v), k


def test_inference_model_structure(built):
    neck, _, model = built
    cfg = inference_cfg(neck)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.WEIGHTS == ""
    assert type(model.roi_heads).__name__ == "CascadeROIHeads"
    bu = model.backbone.bottom_up
    # FREEZE_AT 2: stem and res2 frozen (FrozenBN, no grad); res3 trains.
    assert isinstance(bu.stem.conv1_1.norm, FrozenBatchNorm2d)
    assert isinstance(bu.res2[0].conv2.bn0, FrozenBatchNorm2d) and isinstance(bu.res2[2].conv2.bn1, FrozenBatchNorm2d)
    assert type(bu.res2[0].conv2).__module__ == "timm.layers.split_attn"  # timm's SplitAttn, no copy
    assert not any(p.requires_grad for p in bu.res2.parameters())
    # The split attention's norms are MODEL.RESNETS.NORM's, as every other norm of the block (not frozen).
    norm_type = type(bu.res3[0].conv1.norm)
    assert issubclass(norm_type, torch.nn.modules.batchnorm._BatchNorm) and norm_type is type(bu.res3[0].conv3.norm)
    assert type(bu.res3[0].conv2.bn0) is norm_type and type(bu.res3[0].conv2.bn1) is norm_type
    assert all(p.requires_grad for p in bu.res3.parameters())
    # Radix 2 forces AVD and the avg-pool shortcut where the block strides, and only there.
    assert bu.res2[0].shortcut_avgpool is None and not bu.res2[0].avd
    assert isinstance(bu.res3[0].shortcut_avgpool, torch.nn.AvgPool2d) and bu.res3[0].avd
    assert bu.res3[0].shortcut.stride == (1, 1) and bu.res3[0].conv2.conv.stride == (1, 1)
    assert [len(getattr(bu, f"res{i}")) for i in range(2, 6)] == [3, 4, 23, 3]
    shapes = model.backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def small_cfg(neck: str = "fpn"):
    """ResNeSt-50 (radix 2) + AFI neck kept small: 64-channel FPN, one dense block of growth 16.
    NORM stays Detectron2's default FrozenBN (training-mode BN cannot normalise the attention
    branch's 1x1 pooled map of a single image); STRIDE_IN_1X1 stays d2's default True."""
    cfg = make_cfg("Base-RCNN-FPN-AFIGAN.yaml")
    cfg.MODEL.BACKBONE.NAME = f"build_resnest_{neck}_sr_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.RADIX = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.AFI.NUM_BLOCKS = 1
    cfg.MODEL.AFI.GROWTH = 16
    return cfg


@pytest.mark.parametrize("neck", ["fpn", "pafpn"])
def test_small_resnest_forward_backward(neck):
    cfg = small_cfg(neck)
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    bu = backbone.bottom_up
    assert bu.stem.out_channels == 64  # deep stem, width 32 for depth 50
    x = torch.randn(1, 3, 96, 128)
    feats = backbone(x)
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert sorted(feats) == sorted(strides)
    for name, s in strides.items():
        assert tuple(feats[name].shape) == (1, 64, -(-96 // s), -(-128 // s)), name
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        k: (64, s) for k, s in strides.items()
    }
    sum(f.square().mean() for f in feats.values()).backward()
    for p in [
        bu.stem.conv1_1.weight,
        bu.res2[0].conv2.fc2.weight,
        bu.res5[2].conv2.conv.weight,
        bu.res3[0].shortcut.weight,
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.srf_module.parameters())


def test_bottom_up_strides_and_channels_depth50():
    cfg = small_cfg()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    bu = build_resnest_backbone(cfg, ShapeSpec(channels=3))
    out = bu(torch.randn(1, 3, 64, 64))
    expect = {"res2": (256, 16), "res3": (512, 8), "res4": (1024, 4), "res5": (2048, 2)}
    assert {k: (v.shape[1], v.shape[-1]) for k, v in out.items()} == expect
    assert [len(getattr(bu, f"res{i}")) for i in range(2, 6)] == [3, 4, 6, 3]


def test_radix1_without_resnet_d_tricks_is_plain_resnet50():
    # Radix 1, 7x7 stem, no AVD/avg-down: exactly Detectron2's R-50 layout (23,508,032 parameters).
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg = small_cfg()
    cfg.MODEL.RESNETS.RADIX = 1
    cfg.MODEL.RESNETS.NORM = "BN"
    ours = build_resnest_backbone(cfg, ShapeSpec(channels=3))
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in d2.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 23508032


def split_attention(channels: int, radix: int, norm: str = "BN", groups: int = 1):
    """The split-attention conv a ResNeSt block builds (its conv2); radix 1, which a block builds as a
    plain conv, from timm's SplitAttn the same way."""
    if radix > 1:
        return ResNeStBottleneckBlock(
            channels, 4 * channels, bottleneck_channels=channels // groups, num_groups=groups, norm=norm, radix=radix
        ).conv2
    from timm.layers import SplitAttn

    return SplitAttn(
        channels, channels, 3, padding=1, groups=groups, radix=1, norm_layer=torch.nn.BatchNorm2d if norm else None
    )


def test_radix_softmax_sums_to_one_across_radix():
    radix, card, c = 3, 2, 48
    rsoftmax = split_attention(c, radix, groups=card).rsoftmax
    assert (rsoftmax.radix, rsoftmax.cardinality) == (radix, card)
    logits = torch.randn(2, radix * c, 1, 1)
    w = rsoftmax(logits).reshape(2, radix, c)
    assert torch.allclose(w.sum(dim=1), torch.ones(2, c), atol=1e-6)
    assert (w > 0).all()
    # Radix 1 is a per-channel sigmoid gate.
    assert torch.allclose(split_attention(c, 1, groups=card).rsoftmax(logits).view_as(logits), torch.sigmoid(logits))


def test_split_attention_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    # radix 2, 64 channels: conv 128x32x3x3, bn0 2x128, fc1 (64->32)+bias, bn1 2x32, fc2 (32->128)+bias
    r2 = split_attention(64, 2)
    assert count(r2) == 128 * 32 * 9 + 256 + (32 * 64 + 32) + 64 + (128 * 32 + 128)
    assert [k for k in r2.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))] == [
        "conv.weight",
        "bn0.weight",
        "bn0.bias",
        "fc1.weight",
        "fc1.bias",
        "bn1.weight",
        "bn1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    r1 = split_attention(64, 1)
    assert count(r1) == 64 * 64 * 9 + 128 + (32 * 64 + 32) + 64 + (64 * 32 + 64)
    assert count(r2) - count(r1) == 2240
    y = r2.eval()(torch.randn(2, 64, 9, 9))
    assert y.shape == (2, 64, 9, 9)
    # No norm: bn0/bn1 are parameter-free identities, so the keys are the reference's use_bn=False ones.
    assert sorted(split_attention(64, 2, norm="").state_dict()) == [
        "conv.weight",
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
    ]


@pytest.mark.parametrize(
    "width, radix, groups",
    [
        (64, 2, 1),
        (128, 2, 1),
        (256, 2, 1),
        (512, 2, 1),  # ResNeSt-50/101/200/269 (and the toy's 16, 32)
        (16, 2, 1),
        (32, 2, 1),
        (66, 2, 1),
        (45, 3, 1),
        (48, 3, 2),
        (96, 4, 4),
        (100, 2, 2),
    ],
)
def test_split_attention_width_is_the_references(width, radix, groups):
    from timm.layers import make_divisible

    fc1 = split_attention(width, radix, groups=groups).fc1
    assert (fc1.in_channels, fc1.out_channels, fc1.groups) == (width, max(width * radix // 4, 32), groups)
    if width in (64, 128, 256, 512):  # timm's own default would give the same there
        assert make_divisible(width * radix * 0.25, min_value=32, divisor=8) == fc1.out_channels


def test_split_attention_conv_keeps_pytorch_default_init():
    blk = ResNeStBottleneckBlock(256, 1024, bottleneck_channels=256, radix=2, norm="BN")
    w = blk.conv2.conv.weight  # kaiming_uniform(a=sqrt(5)): |w| <= 1 / sqrt(fan_in)
    assert blk.conv2.conv.bias is None and w.abs().max() <= (256 // 2 * 9) ** -0.5
    assert blk.conv1.weight.std() > 1.5 * w.std()  # conv1 is c2_msra_fill'ed (std sqrt(2 / fan_out))


def reference_split_attention(m, x, radix, groups, norm):
    """conv -> norm -> ReLU -> radix split -> GAP of the sum -> fc1 -> norm -> ReLU -> fc2 ->
    softmax over the splits (sigmoid for radix 1) -> attention-weighted sum of the splits."""

    def bn(t, mod):
        return (
            F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps) if norm else t
        )

    conv = m.conv
    y = F.relu(bn(F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, groups * radix), m.bn0))
    c = y.shape[1] // radix
    splits = [y[:, r * c : (r + 1) * c] for r in range(radix)]
    gap = sum(splits).mean(dim=(2, 3), keepdim=True)
    a = F.relu(bn(F.conv2d(gap, m.fc1.weight, m.fc1.bias, groups=groups), m.bn1))
    logits = F.conv2d(a, m.fc2.weight, m.fc2.bias, groups=groups)  # channels (group, split, c / groups)
    n = x.shape[0]
    if radix > 1:
        att = logits.view(n, groups, radix, c // groups).softmax(dim=2).transpose(1, 2).reshape(n, radix, c, 1, 1)
    else:
        att = logits.sigmoid().view(n, 1, c, 1, 1)
    return sum(att[:, r] * splits[r] for r in range(radix))


@pytest.mark.parametrize(
    "radix, groups, norm", [(1, 1, "BN"), (1, 2, ""), (2, 1, "BN"), (2, 2, "BN"), (2, 1, ""), (4, 2, "BN")]
)
def test_split_attention_equals_reference_math(radix, groups, norm):
    m = split_attention(64, radix, norm=norm, groups=groups).eval()
    with torch.no_grad():
        for mod in (m.bn0, m.bn1):
            if norm:  # non-trivial statistics, so a skipped or misplaced norm shows
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 2)
                mod.bias.uniform_(-1, 1)
        x = torch.randn(2, 64, 7, 9)
        out = m(x)
        expected = reference_split_attention(m, x, radix, groups, norm)
    assert out.shape == (2, 64, 7, 9)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_split_attention_of_identical_splits_is_that_split():
    # With identical splits the attention weights sum to 1, so the output is that split itself.
    # The branch conv has radix * cardinality groups: split r reads input channels [4r, 4r + 4).
    m = split_attention(8, 2, norm="").eval()
    with torch.no_grad():
        w = torch.randn(8, 4, 3, 3)
        m.conv.weight.copy_(torch.cat([w, w], dim=0))  # same kernel in both radix splits
    half = torch.randn(1, 4, 6, 6)
    x = torch.cat([half, half], dim=1)  # ... fed the same input
    split = torch.relu(torch.nn.functional.conv2d(half, w, padding=1))
    assert torch.allclose(m(x), split, atol=1e-5)


def test_depth_34_is_refused():
    cfg = small_cfg()
    cfg.MODEL.RESNETS.DEPTH = 34
    with pytest.raises(ValueError, match="DEPTH 34"):
        build_resnest_backbone(cfg, ShapeSpec(channels=3))
