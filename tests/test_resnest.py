"""ResNeSt backbone: exact reference key/shape layout, checkpoint round trip, a small forward/backward,
split-attention properties and clear config errors."""
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

import afigan  # noqa: E402,F401  (registers the builders)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402

from afigan.modeling.backbones.resnest import build_resnest_backbone  # noqa: E402
from afigan.modeling.backbones.splat import SplAtConv2d, rsoftmax  # noqa: E402
from conftest import load_listing, random_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NECKS = ["FPN", "PAFPN"]


def inference_cfg(neck: str):
    cfg = get_cfg()
    afigan.add_afigan_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "inference", f"AFI-GAN_cascade_mask_rcnn_ResNeSt101_{neck}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


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
    assert isinstance(bu.res2[0].conv2.bn0, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in bu.res2.parameters())
    assert isinstance(bu.res3[0].conv2.bn0, torch.nn.BatchNorm2d)  # SyncBN -> BN on one process
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
    cfg = get_cfg()
    afigan.add_afigan_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-RCNN-FPN-AFIGAN.yaml"))
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
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {k: (64, s) for k, s in strides.items()}
    sum(f.square().mean() for f in feats.values()).backward()
    for p in [bu.stem.conv1_1.weight, bu.res2[0].conv2.fc2.weight, bu.res5[2].conv2.conv.weight, bu.res3[0].shortcut.weight]:
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


def test_rsoftmax_sums_to_one_across_radix():
    radix, card, c = 3, 2, 8
    logits = torch.randn(2, radix * card * c, 1, 1)
    w = rsoftmax(logits, radix, card).reshape(2, radix, card * c)
    assert torch.allclose(w.sum(dim=1), torch.ones(2, card * c), atol=1e-6)
    assert (w > 0).all()
    # Radix 1 is a per-channel sigmoid gate.
    assert torch.allclose(rsoftmax(logits, 1, card), torch.sigmoid(logits))


def test_split_attention_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    # radix 2, 64 channels: conv 128x32x3x3, bn0 2x128, fc1 (64->32)+bias, bn1 2x32, fc2 (32->128)+bias
    r2 = SplAtConv2d(64, 64, 3, radix=2, norm="BN")
    assert count(r2) == 128 * 32 * 9 + 256 + (32 * 64 + 32) + 64 + (128 * 32 + 128)
    r1 = SplAtConv2d(64, 64, 3, radix=1, norm="BN")
    assert count(r1) == 64 * 64 * 9 + 128 + (32 * 64 + 32) + 64 + (64 * 32 + 64)
    assert count(r2) - count(r1) == 2240
    y = r2.eval()(torch.randn(2, 64, 9, 9))
    assert y.shape == (2, 64, 9, 9)


def test_split_attention_of_identical_splits_is_that_split():
    # With identical splits the attention weights sum to 1, so the output is that split itself.
    # The branch conv has radix * cardinality groups: split r reads input channels [4r, 4r + 4).
    m = SplAtConv2d(8, 8, 3, radix=2, norm="").eval()
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


def test_deformable_is_refused():
    cfg = small_cfg()
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    with pytest.raises(NotImplementedError, match="DEFORM_ON_PER_STAGE"):
        build_resnest_backbone(cfg, ShapeSpec(channels=3))
