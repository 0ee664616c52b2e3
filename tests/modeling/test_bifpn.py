"""BiFPN neck with the shared upsampler: modes, call counts, odd sizes, freezing."""

import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import afigan  # noqa: E402
from afigan.modeling.necks.bifpn import AFIBiFPN  # noqa: E402
from afigan.modeling.necks.bifpn_layers import fuse, static_same_max_pool  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<folder>/ -> repo
TOY_CONFIG = os.path.join(REPO, "configs", "toy", "bifpn_toy.yaml")
SWIN_CONFIG = os.path.join(REPO, "configs", "inference", "AFI-GAN_cascade_rcnn_swint_BiFPN_ST.yaml")
WIDTH = 16


def small_cfg(**overrides):
    """R-18 bottom-up (res3..res5), BiFPN of width 16, a one-block AF interpolator."""
    cfg = make_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_bifpn_sr_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.BIFPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.BIFPN.OUT_CHANNELS = WIDTH
    cfg.MODEL.AFI.NUM_BLOCKS = 1
    cfg.MODEL.AFI.GROWTH = 4
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def build(**overrides) -> AFIBiFPN:
    return build_backbone(small_cfg(**overrides))


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def srf_calls_per_forward(neck) -> int:
    """How many times one eval forward of a 128x128 image calls the shared interpolator."""
    calls, handle = count_calls(neck.srf_module)
    neck.eval()
    with torch.no_grad():
        neck(torch.randn(1, 3, 128, 128))
    handle.remove()
    return len(calls)


def test_output_names_channels_strides():
    neck = build()
    shapes = neck.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert all(s.channels == WIDTH for s in shapes.values())
    assert neck.size_divisibility == 128
    neck.eval()
    with torch.no_grad():
        out = neck(torch.randn(1, 3, 128, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"p{lvl}": (1, WIDTH, 128 // 2**lvl, 256 // 2**lvl) for lvl in range(3, 8)
    }


def test_faithful_is_seven_layers_with_one_shared_interpolator_called_28_times():
    neck = build(**{"MODEL.BIFPN.FPN_REPEAT": 3})  # ignored in faithful mode, as in the reference
    assert neck.mode == "faithful" and neck.num_layers == 7
    assert hasattr(neck, "BiFPNLayer_6_conv7_down") and not hasattr(neck, "BiFPNLayer_7_conv7_down")
    srf_ids = {id(p) for p in neck.srf_module.parameters()}
    assert srf_ids and {id(p) for n, p in neck.named_parameters() if "srf_module" in n} == srf_ids
    assert not any("srf_module" in n for n, _ in neck.named_modules() if n.startswith("BiFPNLayer"))
    for k in range(7):
        assert getattr(neck, f"BiFPNLayer_{k}_p7_w2").tolist() == [1.0, 1.0]
        assert getattr(neck, f"BiFPNLayer_{k}_p5_w2").tolist() == [1.0, 1.0, 1.0]
    assert srf_calls_per_forward(neck) == 28


def test_corrected_mode_honours_fpn_repeat():
    neck = build(**{"MODEL.BIFPN.MODE": "corrected", "MODEL.BIFPN.FPN_REPEAT": 3})
    assert neck.num_layers == 3
    layers = {n.split("_")[1] for n, _ in neck.named_parameters() if n.startswith("BiFPNLayer_")}
    assert layers == {"0", "1", "2"}
    assert srf_calls_per_forward(neck) == 12


@pytest.mark.parametrize("mode", ["faithful", "corrected"])
def test_skip_inputs_of_each_mode(mode):
    neck = build(**{"MODEL.BIFPN.MODE": mode, "MODEL.BIFPN.FPN_REPEAT": 3}).eval()
    seen, original = [], neck.bifpn_layer

    def spy(k, a, s):
        seen.append((list(a), list(s)))
        return original(k, a, s)

    neck.bifpn_layer = spy
    with torch.no_grad():
        neck(torch.randn(1, 3, 128, 128))
    laterals = seen[0][0]
    # Layer 0: separate c4/c5 skip projections, then p6, p7.
    assert seen[0][1][0] is not laterals[1] and seen[0][1][2] is laterals[3] and seen[0][1][3] is laterals[4]
    for a, s in seen[1:]:
        expected = laterals[1:] if mode == "faithful" else a[1:]
        assert all(x is y for x, y in zip(s, expected))


def test_nearest_interp_has_no_srf_parameters():
    neck = build(**{"MODEL.AFI.INTERP": "nearest"})
    assert not [n for n, _ in neck.named_parameters() if "srf_module" in n]
    assert not [k for k in neck.state_dict() if "srf_module" in k]
    neck.eval()
    with torch.no_grad():
        assert neck(torch.randn(1, 3, 128, 128))["p7"].shape == (1, WIDTH, 1, 1)


@pytest.mark.parametrize("mode", ["faithful", "corrected"])
@pytest.mark.parametrize("size", [(128, 256), (130, 197)])
def test_forward_backward_divisible_and_odd_sizes(mode, size):
    neck = build(**{"MODEL.BIFPN.MODE": mode, "MODEL.BIFPN.FPN_REPEAT": 2}).train()
    out = neck(torch.randn(2, 3, *size))
    h, w = size
    # R-18 halves with ceil; the top block pools with floor.
    h3, w3 = -(-h // 8), -(-w // 8)
    h5, w5 = -(-h // 32), -(-w // 32)
    assert out["p3"].shape[-2:] == (h3, w3) and out["p6"].shape[-2:] == (h5 // 2, w5 // 2)
    sum(v.pow(2).mean() for v in out.values()).backward()
    grads = {n: p.grad for n, p in neck.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("srf_module"))
    assert grads["BiFPNLayer_1_p7_w2"].abs().sum() > 0


def test_fusion_and_static_same_pool():
    xs = [torch.full((1, 1, 2, 2), v) for v in (1.0, 3.0)]
    w = torch.tensor([2.0, -1.0])
    assert fuse(w, xs, normalised=False).unique().item() == pytest.approx(-1.0)  # raw weights
    assert fuse(w, xs, normalised=True).unique().item() == pytest.approx(2.0 / (2.0 + 1e-4))  # relu + normalise
    pooled = static_same_max_pool(-torch.ones(1, 1, 4, 4))
    # The right/bottom padding is zero, not -inf, so windows touching it return 0 (reference).
    assert pooled.tolist() == [[[[-1.0, 0.0], [0.0, 0.0]]]]
    assert static_same_max_pool(torch.randn(1, 2, 1, 1)).shape == (1, 2, 1, 1)
    assert static_same_max_pool(torch.randn(1, 2, 7, 9), (4, 3)).shape == (1, 2, 4, 3)


def test_separable_conv_and_pre_bifpn_norm_settings():
    neck = build(**{"MODEL.BIFPN.NORM": "BN"})
    sep = neck.BiFPNLayer_3_conv5_up
    assert sep.depthwise.bias is None and sep.depthwise.groups == WIDTH and sep.pointwise.bias is not None
    assert (sep.norm.eps, sep.norm.momentum) == (1e-3, 0.01)
    bn = neck.before_bifpn.lateral4[1]
    assert type(bn) is torch.nn.BatchNorm2d and (bn.eps, bn.momentum) == (1e-3, 0.01)
    assert neck.before_bifpn.top_block.p6.norm is not None


def test_clear_errors():
    with pytest.raises(ValueError, match="MODEL.BIFPN.MODE"):
        build(**{"MODEL.BIFPN.MODE": "efficientdet"})
    with pytest.raises(ValueError, match="MODEL.BIFPN.IN_FEATURES"):
        build(**{"MODEL.BIFPN.IN_FEATURES": ["res4", "res5"]})
    with pytest.raises(ValueError, match="strides"):
        build(
            **{
                "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4"],
                "MODEL.BIFPN.IN_FEATURES": ["res2", "res3", "res4"],
            }
        )


def test_swin_bifpn_builder_runs():
    cfg = small_cfg(
        **{
            "MODEL.BACKBONE.NAME": "build_swint_bifpn_sr_backbone",
            "MODEL.SWINT.EMBED_DIM": 8,
            "MODEL.SWINT.NUM_HEADS": [1, 1, 2, 2],
            "MODEL.SWINT.WINDOW_SIZE": 4,
            "MODEL.SWINT.OUT_FEATURES": ["stage3", "stage4", "stage5"],
            "MODEL.BIFPN.IN_FEATURES": ["stage3", "stage4", "stage5"],
            "MODEL.BACKBONE.FREEZE_AT": -1,
        }
    )
    neck = BACKBONE_REGISTRY.get("build_swint_bifpn_sr_backbone")(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = neck(torch.randn(1, 3, 128, 128))
    assert [tuple(v.shape) for v in out.values()] == [(1, WIDTH, 16 >> i, 16 >> i) for i in range(5)]


@pytest.mark.parametrize(
    "key, value, frozen", [("SRF_FREEZE", "True", True), ("SRF_FREEZE", "False", False), ("AFI_FREEZE", "True", True)]
)
def test_srf_freeze_alias(tmp_path, key, value, frozen):
    path = tmp_path / "freeze.yaml"
    path.write_text(f"MODEL:\n  {key}: {value}\n")
    cfg = small_cfg()
    with pytest.warns(DeprecationWarning) if key == "SRF_FREEZE" else _no_warning():
        cfg.merge_from_file(str(path))
        neck = build_backbone(cfg)
    assert all(p.requires_grad != frozen for p in neck.srf_module.parameters())
    assert all(p.requires_grad for n, p in neck.named_parameters() if not n.startswith("srf_module"))


def test_released_swin_config_with_stale_srf_freeze_key_loads(tmp_path):
    path = tmp_path / "stale.yaml"
    path.write_text(f'_BASE_: "{SWIN_CONFIG}"\nMODEL:\n  SRF_FREEZE: False\n')
    cfg = get_cfg()
    afigan.add_afigan_config(cfg)
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.SRF_FREEZE is False and cfg.MODEL.BACKBONE.NAME == "build_swint_bifpn_sr_backbone"


def test_toy_config_trains_one_step():
    cfg = make_cfg(TOY_CONFIG)
    model = build_model(cfg).train()
    assert type(model.backbone).__name__ == "AFIBiFPN" and model.backbone.output_shape()["p3"].channels == 64
    batch = []
    for h, w in ((128, 160), (150, 200)):
        inst = Instances((h, w), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]])), gt_classes=torch.tensor([1]))
        batch.append({"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "instances": inst})
    if cfg.MODEL.MASK_ON:
        for d in batch:
            d["instances"].gt_masks = PolygonMasks([[[10.0, 12.0, 60.0, 12.0, 60.0, 70.0]]])
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.srf_module.Generators[0][0][0].weight.grad is not None


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
