"""Every detector config of the results table (configs/detectors, configs/toy/detectors): loads,
NN and AFI variants differ only in the interpolator, full models build (and match the reference
checkpoints' layouts where one exists), toy models train one step and predict."""

import glob
import json
import os

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detector_helpers import (  # noqa: E402
    DETECTORS,
    ROOT,
    TOY,
    mapped,
    one_thread,
    toy_dicts,
    train_step,
)
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)
from afigan.config import changed_keys  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

LISTINGS = os.path.join(ROOT, "tests", "fixtures", "official_state_dicts")

# Results-table rows (+ RetinaNet): config stem -> (IMS_PER_BATCH, BASE_LR, MAX_ITER, loss names, masks?)
RPN = {"loss_rpn_cls", "loss_rpn_loc"}
CASCADE = {f"loss_{k}_stage{i}" for k in ("cls", "box_reg") for i in range(3)}
FCOS = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
ROWS = {
    "fcos_R_50_FPN_1x": (16, 0.01, 90000, FCOS, False),
    "fcos_R_50_BiFPN_1x": (16, 0.01, 90000, FCOS, False),
    "mask_rcnn_R_50_FPN_3x": (16, 0.02, 270000, RPN | {"loss_cls", "loss_box_reg", "loss_mask"}, True),
    "mask_rcnn_R_50_PAFPN_3x": (16, 0.02, 270000, RPN | {"loss_cls", "loss_box_reg", "loss_mask"}, True),
    "centermask_R_50_BiFPN_ms_3x": (16, 0.01, 270000, FCOS | {"loss_mask", "loss_maskiou"}, True),
    "cascade_mask_rcnn_S_101_PAFPN_1x": (16, 0.02, 90000, RPN | CASCADE | {"loss_mask"}, True),
    "cascade_rcnn_Swin_T_BiFPN_1x": (16, 0.02, 90000, RPN | CASCADE, False),
    "retinanet_R_50_FPN_1x": (16, 0.01, 90000, {"loss_cls", "loss_box_reg"}, False),
}
BACKBONES = {
    "fcos_R_50_FPN_1x": "build_fcos_resnet_fpn_sr_backbone",
    "fcos_R_50_BiFPN_1x": "build_resnet_bifpn_sr_backbone",
    "mask_rcnn_R_50_FPN_3x": "build_resnet_fpn_sr_backbone",
    "mask_rcnn_R_50_PAFPN_3x": "build_resnet_pafpn_sr_backbone",
    "centermask_R_50_BiFPN_ms_3x": "build_resnet_bifpn_sr_backbone",
    "cascade_mask_rcnn_S_101_PAFPN_1x": "build_resnest_pafpn_sr_backbone",
    "cascade_rcnn_Swin_T_BiFPN_1x": "build_swint_bifpn_sr_backbone",
    "retinanet_R_50_FPN_1x": "build_retinanet_resnet_fpn_sr_backbone",
}
# Full config stem -> toy config stem.
TOYS = {stem: stem.rsplit("_", 2 if stem.endswith("_ms_3x") else 1)[0] for stem in ROWS}


def full(stem, interp):
    return os.path.join(DETECTORS, f"{stem}_{interp}.yaml")


def toy(stem, interp):
    return os.path.join(TOY, f"{TOYS[stem]}_toy_{interp}.yaml")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy") / "afigan_toy")


# The results table's marked rows: self-training (◊) and multi-scale testing (†) variants of a row's
# config, and the Swin-L teacher of the ◊† row; each must build on the config it varies.
VARIANTS = {
    "cascade_rcnn_Swin_T_BiFPN_1x_afi_self_training.yaml": "cascade_rcnn_Swin_T_BiFPN_1x_afi.yaml",
    "cascade_rcnn_Swin_T_BiFPN_1x_nn_self_training.yaml": "cascade_rcnn_Swin_T_BiFPN_1x_nn.yaml",
    "cascade_mask_rcnn_S_101_PAFPN_1x_afi_tta.yaml": "cascade_mask_rcnn_S_101_PAFPN_1x_afi.yaml",
    "cascade_rcnn_Swin_L_BiFPN_1x_afi.yaml": "cascade_rcnn_Swin_T_BiFPN_1x_afi.yaml",
    "cascade_rcnn_Swin_L_BiFPN_1x_afi_self_training_tta.yaml": "cascade_rcnn_Swin_L_BiFPN_1x_afi.yaml",
}
TOY_VARIANTS = {
    "cascade_rcnn_Swin_T_BiFPN_toy_afi_self_training.yaml": "cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml",
    "cascade_mask_rcnn_S_101_PAFPN_toy_afi_tta.yaml": "cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml",
    "centermask_R_50_BiFPN_toy_afi_tta.yaml": "centermask_R_50_BiFPN_toy_afi.yaml",
}


def _base_of(folder, name):
    with open(os.path.join(folder, name)) as f:
        return next(line.split(":", 1)[1].strip().strip('"') for line in f if line.startswith("_BASE_"))


def test_every_row_has_nn_afi_and_toy_configs_and_nothing_else():
    expected = {os.path.basename(full(s, i)) for s in ROWS for i in ("afi", "nn")} | {
        "Base-FCOS.yaml",
        "Base-CenterMask.yaml",
    }
    assert set(os.listdir(DETECTORS)) == expected | set(VARIANTS)
    assert set(os.listdir(TOY)) == {os.path.basename(toy(s, i)) for s in ROWS for i in ("afi", "nn")} | set(
        TOY_VARIANTS
    )
    for folder, variants in ((DETECTORS, VARIANTS), (TOY, TOY_VARIANTS)):
        assert {v: _base_of(folder, v) for v in variants} == variants


def test_configs_use_relative_paths_only():
    for path in glob.glob(os.path.join(DETECTORS, "*.yaml")) + glob.glob(os.path.join(TOY, "*.yaml")):
        with open(path) as f:
            for line in f:
                value = line.split("#")[0].split(":", 1)[-1].strip().strip('"')
                assert not value.startswith("/"), f"{path}: absolute path in {line.strip()!r}"


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_nn_and_afi_differ_only_in_the_interpolator(stem):
    for make in (full, toy):
        afi, nn = make_cfg(make(stem, "afi")), make_cfg(make(stem, "nn"))
        diff = {k for k, _, _ in changed_keys(afi, nn)}
        assert diff == {"MODEL.AFI.INTERP", "OUTPUT_DIR"}, make(stem, "afi")  # each config writes its own folder
        assert (afi.MODEL.AFI.INTERP, nn.MODEL.AFI.INTERP) == ("afi", "nearest")


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_schedule_and_registered_names(stem):
    cfg = make_cfg(full(stem, "afi"))
    ims, lr, max_iter, _, masks = ROWS[stem]
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (ims, lr, max_iter)
    assert cfg.MODEL.MASK_ON == masks
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.MODEL.BACKBONE.NAME == BACKBONES[stem] and cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_full_model_builds(stem):
    cfg = make_cfg(full(stem, "afi"))
    model = build_model(cfg)
    srf = [n for n, _ in model.named_parameters() if ".srf_module." in n]
    assert srf and all(n.startswith("backbone.srf_module.") for n in srf)  # one shared interpolator


@pytest.mark.parametrize(
    "stem,listing",
    [
        ("mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_FPN_afi.json"),
        ("mask_rcnn_R_50_PAFPN_3x", "mask_rcnn_R_50_PAFPN_afi.json"),
        ("cascade_mask_rcnn_S_101_PAFPN_1x", "cascade_mask_rcnn_ResNeSt101_PAFPN_afi.json"),
    ],
)
def test_full_model_has_the_reference_checkpoint_layout(stem, listing):
    with open(os.path.join(LISTINGS, listing)) as f:
        ref = {k: list(v) for k, v in json.load(f)["state_dict_shapes"].items()}
    ours = {k: list(v.shape) for k, v in build_model(make_cfg(full(stem, "afi"))).state_dict().items()}
    assert ours == ref


def test_swin_bifpn_heads_match_the_reference_layout():
    """The reference released Swin-L; with Swin-T the bottom-up differs, everything after the
    BiFPN's input convs (BiFPN layers, RPN, cascade heads) must match names and shapes."""
    with open(os.path.join(LISTINGS, "cascade_rcnn_swin_BiFPN_afi.json")) as f:
        ref = {k: list(v) for k, v in json.load(f)["state_dict_shapes"].items()}
    ours = {
        k: list(v.shape)
        for k, v in build_model(make_cfg(full("cascade_rcnn_Swin_T_BiFPN_1x", "afi"))).state_dict().items()
    }
    keep = lambda k: k.startswith(("roi_heads.", "proposal_generator.", "backbone.BiFPNLayer_", "backbone.srf_module."))  # noqa: E731
    assert {k: v for k, v in ours.items() if keep(k)} == {k: v for k, v in ref.items() if keep(k)}


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_toy_model_trains_one_step_and_predicts(stem, toy_root):
    _, _, _, loss_names, masks = ROWS[stem]
    cfg = make_cfg(
        toy(stem, "afi"),
        "MODEL.FCOS.INFERENCE_TH_TEST",
        0.0,
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        0.0,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        0.0,
    )
    model = build_model(cfg)
    losses = train_step(model, mapped(cfg, toy_dicts(toy_root)[:2], is_train=True))
    assert set(losses) == loss_names
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.srf_module.parameters().__next__().grad is not None  # the interpolator trains
    model.eval()
    inputs = mapped(cfg, toy_dicts(toy_root, "val")[:2], is_train=False)
    with torch.no_grad():
        outputs = model(inputs)
    limit = (
        cfg.MODEL.FCOS.POST_NMS_TOPK_TEST
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "FCOS"
        else cfg.TEST.DETECTIONS_PER_IMAGE
    )
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (inp["height"], inp["width"])
        assert 0 < len(inst) <= limit
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert inst.has("pred_masks") == masks
        if masks:
            assert tuple(inst.pred_masks.shape) == (len(inst), inp["height"], inp["width"])


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_toy_nn_variant_has_a_parameter_free_upsampler(stem):
    model = build_model(make_cfg(toy(stem, "nn")))
    assert sum(p.numel() for p in model.backbone.srf_module.parameters()) == 0


def test_stage2_interpolator_loads_into_every_head():
    """Stage 3 takes only ``srf_module`` tensors from the stage-2 Mask R-CNN: every head's
    interpolator must have the same keys and shapes (here at the toy width)."""
    mask_rcnn = build_model(make_cfg(toy("mask_rcnn_R_50_FPN_3x", "afi")))
    donor = {k: v for k, v in mask_rcnn.state_dict().items() if ".srf_module." in k}
    for stem in ROWS:
        model = build_model(make_cfg(toy(stem, "afi")))
        mine = {k: v for k, v in model.state_dict().items() if ".srf_module." in k}
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in donor.items()}, stem
        model.load_state_dict(donor, strict=False)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in donor.items())


def test_retinanet_nn_backbone_equals_detectron2_stock_retinanet_backbone():
    cfg = make_cfg(toy("retinanet_R_50_FPN_1x", "nn"))
    ours = build_backbone(cfg)
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    stock = build_backbone(stock_cfg)
    stock.load_state_dict(ours.state_dict())  # strict: same names and shapes
    ours.eval(), stock.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = ours(x), stock(x)
    assert sorted(a) == sorted(b) == ["p3", "p4", "p5", "p6", "p7"]
    assert all(torch.equal(a[k], b[k]) for k in a)
