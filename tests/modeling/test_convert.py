import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from afigan.layers import AFInterpolator  # noqa: E402
from afigan.modeling import afi_fpn, use_af_interpolator  # noqa: E402
from afigan.modeling.necks import AFIFPN  # noqa: E402

SMALL = [
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.FPN.OUT_CHANNELS",
    32,
    "MODEL.MASK_ON",
    True,
]


def _stock_mask_rcnn():
    return build_model(make_cfg("Base-RCNN-FPN.yaml", *SMALL)).eval()


def test_use_af_interpolator_keeps_every_weight_and_adds_only_srf_module():
    model = _stock_mask_rcnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_af_interpolator(model, num_blocks=1, growth=8) == ["backbone"]
    assert isinstance(model.backbone, AFIFPN) and isinstance(model.backbone.srf_module, AFInterpolator)
    after = model.state_dict()
    assert set(after) - set(before) == {k for k in after if k.startswith("backbone.srf_module.")}
    assert set(before) <= set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_only_the_upsampling_changes():
    model = _stock_mask_rcnn()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = model.backbone(x)
        use_af_interpolator(model, kind="nearest")
        same = model.backbone(x)
        model.backbone.srf_module = AFInterpolator(32, num_blocks=1, growth=8)
        changed = model.backbone(x)
    for k in ref:
        assert torch.equal(ref[k], same[k]), k
    # p5 has no upsampling before it; p2..p4 do.
    assert torch.equal(ref["p5"], changed["p5"]) and torch.equal(ref["p6"], changed["p6"])
    assert not torch.allclose(ref["p2"], changed["p2"])


def test_use_af_interpolator_loads_weights(tmp_path):
    src = AFInterpolator(32, num_blocks=1, growth=8)
    path = str(tmp_path / "G.pth")
    torch.save({"model": src.state_dict()}, path)
    model = _stock_mask_rcnn()
    use_af_interpolator(model, weights=path, freeze=True, num_blocks=1, growth=8)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.srf_module.state_dict()[k], v)
    assert not any(p.requires_grad for p in model.backbone.srf_module.parameters())


def test_model_without_fpn_is_rejected():
    with pytest.raises(ValueError, match="no stock detectron2 FPN"):
        use_af_interpolator(torch.nn.Linear(2, 2))


def test_lazy_config_helper():
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.modeling import FPN
    from detectron2.modeling.backbone import BasicStem, ResNet
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    node = L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=32,
        top_block=L(LastLevelMaxPool)(),
    )
    neck = instantiate(afi_fpn(node, num_blocks=1, growth=8))
    assert isinstance(neck, AFIFPN) and isinstance(neck.srf_module, AFInterpolator)
    assert neck(torch.randn(1, 3, 64, 64))["p2"].shape == (1, 32, 16, 16)
    with pytest.raises(ValueError, match="expects a LazyConfig node of detectron2's FPN"):
        afi_fpn(L(ResNet)())
