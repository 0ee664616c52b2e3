"""FCOS as a registered yacs component: targets by hand, head, losses, inference, overfitting,
the class-count check and bad inputs."""

import math

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import make_cfg  # noqa: E402
from detector_helpers import (  # noqa: E402
    mapped,
    one_thread,
    synthetic_input,
    toy_dicts,
    train_step,
)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)
from afigan import add_afigan_config  # noqa: E402
from afigan.modeling.fcos import FCOS, FCOSScaledHead, check_num_classes  # noqa: E402
from afigan.modeling.fcos.targets import centerness_targets, fcos_targets  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

FCOS_TOY = "toy/detectors/fcos_R_50_FPN_toy_afi.yaml"
FCOS_LOSSES = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy") / "afigan_toy")


def _two_level_fcos(**kwargs) -> FCOS:
    """FCOS on two levels (strides 8, 16; P3 takes max(l, t, r, b) <= 32) with a tiny head."""
    shapes = [ShapeSpec(channels=8, stride=8), ShapeSpec(channels=8, stride=16)]
    head = FCOSScaledHead(input_shape=shapes, num_classes=3, num_cls_convs=1, num_box_convs=1, norm="")
    return FCOS(in_features=["p3", "p4"], strides=[8, 16], head=head, num_classes=3, sizes_of_interest=[32], **kwargs)


# ---------------------------------------------------------------- config keys


def test_config_keys_have_centermask2_names_and_defaults():
    cfg = add_afigan_config(get_cfg())
    f = cfg.MODEL.FCOS
    assert f.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"] and f.FPN_STRIDES == [8, 16, 32, 64, 128]
    assert (f.NUM_CLASSES, f.NMS_TH, f.POS_RADIUS, f.LOC_LOSS_TYPE, f.TOP_LEVELS) == (80, 0.6, 1.5, "giou", 2)
    assert f.SIZES_OF_INTEREST == [64, 128, 256, 512] and f.CENTER_SAMPLE and f.NORM == "GN"
    assert cfg.MODEL.MASKIOU_ON is False and cfg.MODEL.ROI_MASKIOU_HEAD.NAME == "MaskIoUHead"
    assert cfg.MODEL.ROI_MASK_HEAD.ASSIGN_CRITERION == "area"
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    add_afigan_config(cfg)  # idempotent: a merged value survives a second call
    assert cfg.MODEL.FCOS.NUM_CLASSES == 3
    assert "FCOS" in PROPOSAL_GENERATOR_REGISTRY
    assert "build_fcos_resnet_fpn_sr_backbone" in BACKBONE_REGISTRY


# ---------------------------------------------------------------- targets by hand


def test_targets_for_two_boxes_match_hand_computation():
    """64x64 image, P3 (8x8 locations at 4, 12, ..., 60) and P4 (4x4 at 8, 24, 40, 56), radius 1.5.

    Box A (0, 0, 24, 16), class 2: on P3 the locations x in {4, 12, 20}, y in {4, 12} are inside,
    within 12 px of its centre (12, 8), and have max distance <= 20 <= 32; on P4 only (8, 8) is
    inside and its max distance 16 < 32 puts it out of P4's range.
    Box B (16, 8, 64, 56), class 0, centre (40, 32): on P3 centre sampling keeps x, y within
    12 px -> x in {36, 44}, y in {28, 36} (max distance 28); on P4 within 24 px -> x in
    {24, 40, 56}, y in {24, 40}, max distances 32 or 40 >= 32 (32 is inclusive).
    """
    fcos = _two_level_fcos()
    feats = [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]
    anchors = fcos.anchor_generator(feats)
    gt = Instances(
        (64, 64), gt_boxes=Boxes(torch.tensor([[0.0, 0, 24, 16], [16, 8, 64, 56]])), gt_classes=torch.tensor([2, 0])
    )
    labels, boxes = fcos.label_locations(anchors, [gt])
    labels, boxes = labels[0], boxes[0]
    points = Boxes.cat(anchors).get_centers()

    def positives(level_slice, cls):
        sel = torch.zeros_like(labels, dtype=torch.bool)
        sel[level_slice] = True
        return sorted(tuple(int(v) for v in p) for p in points[sel & (labels == cls)])

    p3, p4 = slice(0, 64), slice(64, 80)
    assert positives(p3, 2) == [(4, 4), (4, 12), (12, 4), (12, 12), (20, 4), (20, 12)]
    assert positives(p4, 2) == []
    assert positives(p3, 0) == [(36, 28), (36, 36), (44, 28), (44, 36)]
    assert positives(p4, 0) == [(24, 24), (24, 40), (40, 24), (40, 40), (56, 24), (56, 40)]
    assert int((labels == 3).sum()) == 80 - 16  # everything else is background

    # Regression targets (l, t, r, b) in units of the level's stride, and centerness.
    deltas = fcos.box2box_transform.get_deltas(Boxes.cat(anchors).tensor, boxes)
    ctr = centerness_targets(points, boxes)
    idx = {tuple(int(v) for v in points[i]) + (i >= 64,): i for i in range(80)}
    a, b = idx[(4, 4, False)], idx[(40, 40, True)]
    assert deltas[a].tolist() == pytest.approx([4 / 8, 4 / 8, 20 / 8, 12 / 8])
    assert float(ctr[a]) == pytest.approx(math.sqrt(4 / 20 * 4 / 12))
    assert deltas[b].tolist() == pytest.approx([24 / 16, 32 / 16, 24 / 16, 16 / 16])
    assert float(ctr[b]) == pytest.approx(math.sqrt(1.0 * 16 / 32))
    c = idx[(12, 12, False)]
    assert float(ctr[c]) == pytest.approx(math.sqrt(1.0 * 4 / 12))


def test_targets_without_center_sampling_and_ambiguity_take_the_smaller_box():
    points = torch.tensor([[20.0, 20.0], [5.0, 5.0], [100.0, 100.0]])
    strides = torch.full((3,), 8.0)
    ranges = torch.tensor([[-1.0, 1e8]] * 3)
    gt = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 10.0, 30.0, 30.0]])
    labels, boxes = fcos_targets(points, strides, ranges, gt, torch.tensor([1, 2]), 3, center_sample=False)
    assert labels.tolist() == [2, 1, 3]  # inside both -> the smaller (class 2); outside all -> background
    assert boxes[0].tolist() == [10.0, 10.0, 30.0, 30.0] and boxes[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    # With centre sampling (radius 1.5 x 8 = 12 px), (5, 5) is 27 px from the big box's centre.
    labels, _ = fcos_targets(points, strides, ranges, gt, torch.tensor([1, 2]), 3, center_sample=True)
    assert labels.tolist() == [2, 3, 3]


def test_zero_width_box_gets_no_positive_location():
    points = torch.tensor([[10.0, 20.0], [12.0, 20.0]])
    labels, _ = fcos_targets(
        points,
        torch.full((2,), 8.0),
        torch.tensor([[-1.0, 1e8]] * 2),
        torch.tensor([[10.0, 10.0, 10.0, 40.0]]),
        torch.tensor([0]),
        3,
    )
    assert labels.tolist() == [3, 3]


# ---------------------------------------------------------------- head


def test_head_towers_scales_and_output_shapes():
    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16, 32)]
    head = FCOSScaledHead(
        input_shape=shapes,
        num_classes=5,
        num_cls_convs=1,
        num_box_convs=3,
        num_share_convs=2,
        norm="GN",
        use_scale=True,
    )
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert (convs(head.cls_subnet), convs(head.bbox_subnet), convs(head.share_subnet)) == (1, 3, 2)
    assert len(head.scales) == 3
    feats = [torch.randn(2, 32, 40 // s * 2, 24 // s * 2) for s in (2, 4, 8)]
    logits, reg, ctr = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 5) + tuple(f.shape[-2:]) for f in feats]
    assert [tuple(x.shape) for x in reg] == [(2, 4) + tuple(f.shape[-2:]) for f in feats]
    assert [tuple(x.shape) for x in ctr] == [(2, 1) + tuple(f.shape[-2:]) for f in feats]
    assert all((x >= 0).all() for x in reg)  # ReLU distances
    # The classifier starts at the prior probability.
    assert torch.sigmoid(head.cls_score.bias).allclose(torch.full((5,), 0.01))
    # The scale of a level multiplies that level's regression only (before the ReLU).
    with torch.no_grad():
        head.scales[1].scale.fill_(0.0)
    _, reg2, _ = head(feats)
    assert torch.equal(reg2[0], reg[0]) and not reg2[1].any() and reg[1].any()


def test_exp_distances_and_deformable_towers_run_on_cpu():
    shapes = [ShapeSpec(channels=8, stride=8)]
    head = FCOSScaledHead(
        input_shape=shapes,
        num_classes=2,
        num_cls_convs=1,
        num_box_convs=1,
        norm="",
        use_relu=False,
        use_deformable=True,
    )
    assert type(head.bbox_subnet[0]).__name__ == "DeformConv3x3"
    _, reg, _ = head([torch.randn(1, 8, 6, 6)])
    assert (reg[0] > 0).all()


# ---------------------------------------------------------------- model


def test_backbone_outputs_p3_to_p7_and_fpn_strides_are_checked():
    cfg = make_cfg(FCOS_TOY)
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert sorted(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [shapes[f"p{i}"].stride for i in range(3, 8)] == [8, 16, 32, 64, 128]
    bad = make_cfg(FCOS_TOY, "MODEL.FCOS.FPN_STRIDES", [8, 16, 32, 64, 64])
    with pytest.raises(
        ValueError, match=r"MODEL.FCOS.FPN_STRIDES .* set MODEL.FCOS.FPN_STRIDES to \[8, 16, 32, 64, 128\]"
    ):
        build_model(bad)
    no_top = make_cfg(FCOS_TOY, "MODEL.FCOS.TOP_LEVELS", 0)
    with pytest.raises(ValueError, match="TOP_LEVELS"):
        build_model(no_top)


def test_one_iteration_and_inference_on_toy_images(toy_root):
    cfg = make_cfg(FCOS_TOY, "MODEL.FCOS.INFERENCE_TH_TEST", 0.0, "MODEL.FCOS.POST_NMS_TOPK_TEST", 20)
    model = build_model(cfg)
    losses = train_step(model, mapped(cfg, toy_dicts(toy_root)[:2], is_train=True))
    assert set(losses) == FCOS_LOSSES
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert all(p.grad is not None for p in model.proposal_generator.head.parameters())
    model.eval()
    inputs = mapped(cfg, toy_dicts(toy_root, "val")[:2], is_train=False)
    with torch.no_grad():
        outputs = model(inputs)
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (inp["height"], inp["width"])
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert 0 < len(inst) <= 20
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert (inst.pred_classes < 3).all()
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= inp["width"]).all() and (b[:, 3] <= inp["height"]).all()


def test_trains_with_detectron2_simple_trainer(toy_root):
    from detectron2.engine import SimpleTrainer
    from detectron2.solver import build_optimizer

    cfg = make_cfg(FCOS_TOY)
    model = build_model(cfg)
    batch = mapped(cfg, toy_dicts(toy_root)[:2], is_train=True)
    scale_before = model.proposal_generator.head.scales[0].scale.clone()
    trainer = SimpleTrainer(model, iter([batch] * 3), build_optimizer(cfg, model))
    trainer.train(0, 2)
    total = trainer.storage.history("total_loss").values()
    assert len(total) == 2 and all(math.isfinite(v) for v, _ in total)
    assert not torch.equal(model.proposal_generator.head.scales[0].scale, scale_before)  # scales are trained


def test_tiny_fcos_overfits_one_toy_image(toy_root):
    """Loss falls by at least half in 100 SGD iterations on one image (R-18, 80 px, 1-conv towers)."""
    cfg = make_cfg(
        FCOS_TOY,
        "MODEL.FCOS.NUM_CLS_CONVS",
        1,
        "MODEL.FCOS.NUM_BOX_CONVS",
        1,
        "MODEL.AFI.INTERP",
        "nearest",
        "INPUT.MIN_SIZE_TRAIN",
        (80,),
        "INPUT.RANDOM_FLIP",
        "none",
    )
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = mapped(cfg, toy_dicts(toy_root)[:1], is_train=True)
    assert len(batch[0]["instances"]) > 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    history = []
    with EventStorage():
        for _ in range(100):
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
    first = sum(history[0].values())
    last = sum(sum(h.values()) for h in history[-5:]) / 5
    assert last <= 0.5 * first, (first, last)
    # Not only the classifier's prior: the box loss must improve too.
    assert history[-1]["loss_fcos_loc"] < 0.8 * history[0]["loss_fcos_loc"]


# ---------------------------------------------------------------- NUM_CLASSES check


def test_num_classes_mismatch_with_data_set_names_the_key():
    cfg = make_cfg(FCOS_TOY, "MODEL.FCOS.NUM_CLASSES", 80)
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "MODEL.FCOS.NUM_CLASSES=80" in msg and "'afigan_toy_train' has 3 categories" in msg
    assert "set MODEL.FCOS.NUM_CLASSES to 3" in msg
    assert "MODEL.ROI_HEADS" not in msg  # a one-stage detector has no ROI heads to configure
    check_num_classes(make_cfg(FCOS_TOY))  # consistent: no error


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def fcos_model():
    cfg = make_cfg(FCOS_TOY, "MODEL.FCOS.INFERENCE_TH_TEST", 0.0)
    return cfg, build_model(cfg)


@pytest.mark.parametrize("case", ["no_annotations", "zero_width_box", "smaller_than_largest_stride"])
def test_bad_input_does_not_crash(case, fcos_model):
    cfg, model = fcos_model
    if case == "no_annotations":
        batch = [synthetic_input(96, 128, [], []), synthetic_input(96, 96, [[10, 10, 60, 70]], [1])]
        batch[0]["instances"].gt_boxes = Boxes(torch.zeros((0, 4)))
    elif case == "zero_width_box":
        batch = [synthetic_input(96, 96, [[40, 10, 40, 90], [10, 10, 60, 70]], [0, 2])]
    else:
        batch = [synthetic_input(40, 56, [[5, 5, 30, 35]], [1]), synthetic_input(20, 20, [[2, 2, 18, 18]], [0])]
    losses = train_step(model, batch)
    assert set(losses) == FCOS_LOSSES and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    for out, x in zip(outputs, batch):
        inst = out["instances"]
        assert inst.image_size == (x["height"], x["width"]) and len(inst) <= cfg.MODEL.FCOS.POST_NMS_TOPK_TEST
        assert torch.isfinite(inst.pred_boxes.tensor).all()
