import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("detectron2")

from d2_helpers import make_cfg, toy_batch  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from afigan.layers import AFInterpolator  # noqa: E402

SMALL = [
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.FPN.OUT_CHANNELS",
    32,
    "MODEL.AFI.NUM_BLOCKS",
    1,
    "MODEL.AFI.GROWTH",
    8,
]


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    return calls


def test_nearest_fpn_equals_detectron2_stock_fpn():
    stock = build_backbone(make_cfg("Base-RCNN-FPN.yaml", *SMALL)).eval()
    ours = build_backbone(make_cfg("Base-RCNN-FPN-AFIGAN.yaml", *SMALL, "MODEL.AFI.INTERP", "nearest")).eval()
    assert type(ours).__name__ == "AFIFPN"
    ours.load_state_dict(stock.state_dict(), strict=True)  # nearest adds no parameters
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        a, b = stock(x), ours(x)
    assert list(a) == list(b) == ["p2", "p3", "p4", "p5", "p6"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert stock.output_shape() == ours.output_shape()
    assert stock.size_divisibility == ours.size_divisibility == 32


@pytest.mark.parametrize("name,calls", [("build_resnet_fpn_sr_backbone", 3), ("build_resnet_pafpn_sr_backbone", 3)])
def test_afi_interpolator_is_one_shared_module(name, calls):
    neck = build_backbone(make_cfg("Base-RCNN-FPN-AFIGAN.yaml", *SMALL, "MODEL.BACKBONE.NAME", name))
    assert isinstance(neck.srf_module, AFInterpolator)
    assert sum(isinstance(m, AFInterpolator) for m in neck.modules()) == 1
    seen = _count_calls(neck.srf_module)
    out = neck(torch.randn(1, 3, 128, 96))
    assert len(seen) == calls
    assert seen == [(1, 32, 8, 6), (1, 32, 16, 12), (1, 32, 32, 24)]
    assert {k: v.stride for k, v in neck.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert all(v.shape[1] == 32 for v in out.values())


def test_pafpn_matches_its_definition():
    neck = build_backbone(
        make_cfg(
            "Base-RCNN-FPN-AFIGAN.yaml",
            *SMALL,
            "MODEL.BACKBONE.NAME",
            "build_resnet_pafpn_sr_backbone",
            "MODEL.AFI.INTERP",
            "nearest",
        )
    ).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = neck(x)
        c = neck.bottom_up(x)
        lat = {i: getattr(neck, f"fpn_lateral{i}")(c[f"res{i}"]) for i in (2, 3, 4, 5)}
        t = {5: lat[5]}
        for i in (4, 3, 2):
            t[i] = lat[i] + F.interpolate(t[i + 1], scale_factor=2.0, mode="nearest")
        m = {2: t[2]}
        for i in (3, 4, 5):
            m[i] = t[i] + F.relu(getattr(neck, f"pafpn_downsample{i}")(m[i - 1]))
        ref = {f"p{i}": getattr(neck, f"pafpn_output{i}")(m[i]) for i in (2, 3, 4, 5)}
        ref["p6"] = F.max_pool2d(ref["p5"], kernel_size=1, stride=2)
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-6), k
    assert not any(n.startswith("fpn_output") for n, _ in neck.named_children())


@pytest.mark.parametrize("freeze_key", ["MODEL.AFI_FREEZE", "MODEL.SRF_FREEZE"])
def test_afi_freeze_removes_interpolator_from_optimizer(freeze_key):
    cfg = make_cfg("toy/fpn_toy.yaml", freeze_key, True)
    if freeze_key == "MODEL.SRF_FREEZE":  # the reference's spelling still works, with a deprecation warning
        with pytest.warns(DeprecationWarning, match="MODEL.SRF_FREEZE is deprecated"):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    srf = {id(p) for p in model.backbone.srf_module.parameters()}
    assert srf and all(not p.requires_grad for p in model.backbone.srf_module.parameters())
    opt_params = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert not srf & opt_params
    cfg = make_cfg("toy/fpn_toy.yaml")
    model = build_model(cfg)
    opt_params = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert {id(p) for p in model.backbone.srf_module.parameters()} <= opt_params


@pytest.mark.parametrize("config", ["toy/fpn_toy.yaml", "toy/pafpn_toy.yaml"])
def test_mask_rcnn_forward_backward_on_odd_sizes(config):
    model = build_model(make_cfg(config))
    model.train()
    # Odd image sizes; the batch is padded to /32, and the neck also copes with odd maps.
    with EventStorage():
        losses = model(toy_batch(sizes=((131, 197), (97, 75))))
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.srf_module.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", ["build_resnet_fpn_sr_backbone", "build_resnet_pafpn_sr_backbone"])
def test_neck_handles_inputs_not_divisible_by_its_stride(name):
    neck = build_backbone(make_cfg("Base-RCNN-FPN-AFIGAN.yaml", *SMALL, "MODEL.BACKBONE.NAME", name))
    out = neck(torch.randn(1, 3, 99, 71))
    assert out["p2"].shape[-2:] == (25, 18) and out["p5"].shape[-2:] == (4, 3)


def test_unknown_interpolator_kind_is_one_clear_sentence():
    with pytest.raises(ValueError, match=r"MODEL.AFI.INTERP: Unknown upsampler kind 'bicubic'; expected one of"):
        build_backbone(make_cfg("Base-RCNN-FPN-AFIGAN.yaml", *SMALL, "MODEL.AFI.INTERP", "bicubic"))
