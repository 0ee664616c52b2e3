"""CenterMask: SAG-Mask, MaskIoU targets and rescoring, area-ratio level assignment, the whole
model on toy images, the class-count check and bad inputs."""

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
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)
from afigan.modeling.roi_heads import (  # noqa: E402
    MaskIoUHead,
    RatioROIPooler,
    SpatialAttentionMaskHead,
    assign_boxes_to_levels_by_ratio,
)
from afigan.modeling.roi_heads.maskiou_head import mask_iou_inference, mask_iou_loss, mask_iou_targets  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

CM_TOY = "toy/detectors/centermask_R_50_BiFPN_toy_afi.yaml"
CM_LOSSES = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_maskiou"}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy") / "afigan_toy")


@pytest.fixture(scope="module")
def centermask():
    cfg = make_cfg(CM_TOY, "MODEL.FCOS.INFERENCE_TH_TEST", 0.0)
    return cfg, build_model(cfg)


# ---------------------------------------------------------------- SAG-Mask


def test_sag_mask_output_shape_names_and_order():
    assert ROI_MASK_HEAD_REGISTRY.get("SpatialAttentionMaskHead") is SpatialAttentionMaskHead
    head = SpatialAttentionMaskHead(ShapeSpec(channels=16, height=14, width=14), num_classes=3, conv_dims=[8, 8, 8])
    x = torch.randn(5, 16, 14, 14)
    assert tuple(head.layers(x).shape) == (5, 3, 28, 28)
    names = {k for k, _ in head.named_parameters()}
    assert {
        "mask_fcn1.weight",
        "mask_fcn2.weight",
        "spatialAtt.conv.weight",
        "deconv.weight",
        "predictor.weight",
    } <= names
    att = head.spatialAtt.attention(head.mask_fcn2(head.mask_fcn1(x)))
    assert tuple(att.shape) == (5, 1, 14, 14) and ((att > 0) & (att < 1)).all()
    # convs -> attention -> deconv -> ReLU -> predictor, in that order.
    y = head.spatialAtt(head.mask_fcn2(head.mask_fcn1(x)))
    expected = head.predictor(torch.relu(head.deconv(y)))
    assert torch.allclose(head.layers(x), expected)
    agnostic = SpatialAttentionMaskHead(ShapeSpec(channels=16, height=14, width=14), num_classes=1, conv_dims=[8, 8])
    assert tuple(agnostic.layers(x).shape) == (5, 1, 28, 28)


# ---------------------------------------------------------------- MaskIoU


@pytest.mark.parametrize("kind", ["bitmask", "polygon"])
def test_mask_iou_target_counts_the_whole_object(kind):
    """Object = the square (0, 0)-(4, 4) of an 8x8 image (area 16); the RoI (0, 0, 2, 4) sees half of it.

    In 4x4 RoI pixels the whole object is 16 * 16 / 8 = 32 pixels; a mask predicted everywhere in
    the RoI covers 16 of them -> IoU 16 / 32 = 0.5 (not 1, as a crop-only IoU would say); a mask on
    the top half of the RoI -> 8 / (8 + 32 - 8) = 0.25.
    """
    if kind == "bitmask":
        t = torch.zeros(1, 8, 8, dtype=torch.bool)
        t[0, :4, :4] = True
        masks = BitMasks(t)
    else:
        masks = PolygonMasks([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]]])
    inst = Instances((8, 8), proposal_boxes=Boxes(torch.tensor([[0.0, 0.0, 2.0, 4.0]])), gt_masks=masks)
    full = torch.ones(1, 4, 4)
    top = torch.full((1, 4, 4), -1.0)
    top[:, :2] = 1.0
    assert mask_iou_targets(full, [inst]).tolist() == pytest.approx([0.5])
    assert mask_iou_targets(top, [inst]).tolist() == pytest.approx([0.25])


def test_maskiou_head_shapes_and_loss():
    head = MaskIoUHead(
        input_shape=ShapeSpec(channels=16, height=14, width=14), num_classes=3, conv_dim=8, num_conv=2, fc_dim=32
    )
    pred = head(torch.randn(4, 16, 14, 14), torch.rand(4, 1, 28, 28))
    assert tuple(pred.shape) == (4, 3)
    gt_classes, targets = torch.tensor([0, 2, 1, 1]), torch.tensor([0.5, 0.0, 1.0, 0.25])
    loss = mask_iou_loss(pred, gt_classes, targets, loss_weight=2.0)
    chosen = pred[torch.arange(4), gt_classes]
    pos = targets > 0  # RoIs with IoU 0 do not count
    assert float(loss.detach()) == pytest.approx(
        float(2.0 * 0.5 * ((chosen[pos] - targets[pos]) ** 2).sum().detach() / 3)
    )
    zero = mask_iou_loss(pred, gt_classes, torch.zeros(4))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@pytest.mark.parametrize("channels,fc_dim,num_conv", [(64, 128, 2), (256, 1024, 4)])
def test_maskiou_head_init_keeps_the_activation_scale(channels, fc_dim, num_conv):
    """The FC layers neither blow up nor kill unit-scale inputs (CenterMask2's fan_out init grew
    them 3-5x, and training diverged)."""
    head = MaskIoUHead(
        input_shape=ShapeSpec(channels=channels, height=14, width=14),
        num_classes=3,
        conv_dim=channels,
        num_conv=num_conv,
        fc_dim=fc_dim,
    )
    x = torch.cat([torch.randn(16, channels, 14, 14), torch.rand(16, 1, 14, 14)], dim=1)
    for conv in head.convs:
        x = conv(x)
    fc1 = torch.relu(head.maskiou_fc1(x.flatten(1)))
    fc2 = torch.relu(head.maskiou_fc2(fc1))
    rms = lambda t: float(t.detach().pow(2).mean().sqrt())  # noqa: E731
    assert 0.5 < rms(fc1) / rms(x) < 2 and 0.5 < rms(fc2) / rms(x) < 2


def test_maskiou_rescoring_changes_mask_scores():
    a = Instances((10, 10), scores=torch.tensor([0.9, 0.5]), pred_classes=torch.tensor([1, 0]))
    b = Instances((10, 10), scores=torch.tensor([0.8]), pred_classes=torch.tensor([2]))
    pred_iou = torch.tensor([[0.1, 0.6, 0.3], [0.4, 0.2, 0.9], [0.7, 0.5, 1.3]])
    mask_iou_inference(pred_iou, [a, b])
    assert a.mask_scores.tolist() == pytest.approx([0.9 * 0.6, 0.5 * 0.4])
    assert b.mask_scores.tolist() == pytest.approx([0.8 * 1.0])  # predicted IoU clamped to 1
    assert a.scores.tolist() == pytest.approx([0.9, 0.5])  # box scores unchanged


# ---------------------------------------------------------------- level assignment


def test_level_assignment_by_area_ratio_on_hand_made_boxes():
    """k = ceil(5 - log2(image area / box area)) clamped to [3, 5] (p3..p5), image 100 x 100."""
    boxes = Boxes(
        torch.tensor(
            [
                [0.0, 0, 100, 100],  # ratio 1   -> ceil(5 - 0)     = 5
                [0.0, 0, 50, 100],  # ratio 2   -> ceil(5 - 1)     = 4
                [0.0, 0, 40, 100],  # ratio 2.5 -> ceil(3.68)      = 4
                [0.0, 0, 50, 50],  # ratio 4   -> ceil(5 - 2)     = 3
                [0.0, 0, 10, 10],
            ]
        )
    )  # ratio 100 -> ceil(-1.64) -> 3 (clamped)
    assert assign_boxes_to_levels_by_ratio([boxes], [(100, 100)], 3, 5).tolist() == [2, 1, 1, 0, 0]
    # The same 50 x 100 box in a twice larger image goes one level down.
    assert assign_boxes_to_levels_by_ratio([boxes[1:2]], [(200, 100)], 3, 5).tolist() == [0]


def test_ratio_pooler_pools_from_the_assigned_level():
    # Level l is filled with the value l, so the pooled value says which level a box came from.
    feats = [torch.full((1, 2, 128 // s, 128 // s), float(l)) for l, s in zip((3, 4, 5), (8, 16, 32))]
    boxes = [Boxes(torch.tensor([[0.0, 0, 128, 128], [0.0, 0, 20, 20]]))]
    ratio = RatioROIPooler(
        output_size=4,
        scales=(1 / 8, 1 / 16, 1 / 32),
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        assign_criterion="ratio",
    )
    area = RatioROIPooler(
        output_size=4,
        scales=(1 / 8, 1 / 16, 1 / 32),
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        assign_criterion="area",
    )
    by_ratio = ratio(feats, boxes, [(128, 128)]).mean(dim=(1, 2, 3)).tolist()
    by_area = area(feats, boxes).mean(dim=(1, 2, 3)).tolist()
    assert by_ratio == pytest.approx([5.0, 3.0])
    assert by_area == pytest.approx([3.0, 3.0])  # FPN's rule: 128 px < 224 px canonical -> below p4
    with pytest.raises(ValueError, match="ASSIGN_CRITERION"):
        RatioROIPooler(
            output_size=4, scales=(1 / 8,), sampling_ratio=0, pooler_type="ROIAlignV2", assign_criterion="size"
        )


# ---------------------------------------------------------------- model


def test_builds_as_generalized_rcnn_with_fcos_and_center_roi_heads(centermask):
    cfg, model = centermask
    assert type(model).__name__ == "GeneralizedRCNN"
    assert type(model.proposal_generator).__name__ == "FCOS" and model.proposal_generator.yield_proposal
    assert ROI_HEADS_REGISTRY.get("CenterROIHeads") is type(model.roi_heads)
    assert isinstance(model.roi_heads.mask_head, SpatialAttentionMaskHead)
    assert model.roi_heads.mask_pooler.assign_criterion == "ratio"
    assert isinstance(model.roi_heads.maskiou_head, MaskIoUHead)
    assert not hasattr(model.roi_heads, "box_head")  # FCOS's boxes are the detections


def test_one_iteration_and_inference_on_toy_images(centermask, toy_root):
    cfg, model = centermask
    losses = train_step(model, mapped(cfg, toy_dicts(toy_root)[:2], is_train=True))
    assert set(losses) == CM_LOSSES
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0
    assert model.roi_heads.maskiou_head.maskiou.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_head.spatialAtt.conv.weight.grad.abs().sum() > 0
    model.eval()
    inputs = mapped(cfg, toy_dicts(toy_root, "val")[:2], is_train=False)
    with torch.no_grad():
        outputs = model(inputs)
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        h, w = inp["height"], inp["width"]
        assert inst.image_size == (h, w)
        assert 0 < len(inst) <= cfg.MODEL.FCOS.POST_NMS_TOPK_TEST == 50
        assert tuple(inst.pred_masks.shape) == (len(inst), h, w) and inst.pred_masks.dtype == torch.bool
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.mask_scores >= 0) & (inst.mask_scores <= inst.scores)).all()
        assert not torch.equal(inst.mask_scores, inst.scores)  # MaskIoU rescored the masks


def test_trains_stably_with_detectron2_simple_trainer(toy_root):
    """Ten SGD steps at the full learning rate (no warm-up) keep every loss finite and the MaskIoU
    loss small: the MaskIoU gradient reaches the mask head and the backbone."""
    from detectron2.engine import SimpleTrainer
    from detectron2.solver import build_optimizer

    torch.manual_seed(0)
    cfg = make_cfg(CM_TOY)
    model = build_model(cfg)
    dicts = toy_dicts(toy_root)
    batches = [mapped(cfg, [dicts[i % 4], dicts[(i + 1) % 4]], is_train=True, seed=i) for i in range(10)]
    trainer = SimpleTrainer(model, iter(batches), build_optimizer(cfg, model))
    trainer.train(0, 10)
    history = trainer.storage.history
    assert all(math.isfinite(v) for v, _ in history("total_loss").values())
    assert max(v for v, _ in history("loss_maskiou").values()) < 1.0


def test_without_maskiou_and_with_area_assignment(toy_root):
    cfg = make_cfg(CM_TOY, "MODEL.MASKIOU_ON", False, "MODEL.ROI_MASK_HEAD.ASSIGN_CRITERION", "area")
    model = build_model(cfg)
    assert model.roi_heads.maskiou_head is None and model.roi_heads.mask_pooler.assign_criterion == "area"
    losses = train_step(model, mapped(cfg, toy_dicts(toy_root)[:1], is_train=True))
    assert set(losses) == CM_LOSSES - {"loss_maskiou"}


def test_mask_on_false_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="set MODEL.MASK_ON True"):
        build_model(make_cfg(CM_TOY, "MODEL.MASK_ON", False))


def test_num_classes_mismatch_between_fcos_and_roi_heads_names_both_keys():
    with pytest.raises(ValueError) as e:
        build_model(make_cfg(CM_TOY, "MODEL.ROI_HEADS.NUM_CLASSES", 80))
    msg = str(e.value)
    assert "MODEL.FCOS.NUM_CLASSES=3" in msg and "MODEL.ROI_HEADS.NUM_CLASSES=80" in msg
    assert "set MODEL.FCOS.NUM_CLASSES and MODEL.ROI_HEADS.NUM_CLASSES to 3" in msg
    assert "no background class" in msg
    with pytest.raises(ValueError, match="set MODEL.FCOS.NUM_CLASSES and MODEL.ROI_HEADS.NUM_CLASSES to 3"):
        build_model(make_cfg(CM_TOY, "MODEL.ROI_HEADS.NUM_CLASSES", 4, "MODEL.FCOS.NUM_CLASSES", 4))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["no_annotations", "zero_width_box", "smaller_than_largest_stride"])
def test_bad_input_does_not_crash(case, centermask):
    cfg, model = centermask
    if case == "no_annotations":
        batch = [synthetic_input(96, 128, [], []), synthetic_input(96, 96, [], [])]
        for x in batch:
            x["instances"].gt_boxes = Boxes(torch.zeros((0, 4)))
    elif case == "zero_width_box":
        # Two images: the toy BiFPN's BN sees a 1x1 p7, which BN cannot normalise for one image.
        batch = [
            synthetic_input(96, 96, [[40, 10, 40, 90], [10, 10, 60, 70]], [0, 2]),
            synthetic_input(96, 96, [[20, 30, 50, 30]], [1]),
        ]
    else:
        batch = [synthetic_input(40, 56, [[5, 5, 30, 35]], [1]), synthetic_input(20, 20, [[2, 2, 18, 18]], [0])]
    losses = train_step(model, batch)
    assert set(losses) == CM_LOSSES and all(torch.isfinite(v) for v in losses.values())
    if case == "no_annotations":
        assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_maskiou"].detach()) == 0.0
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    for out, x in zip(outputs, batch):
        inst = out["instances"]
        assert inst.image_size == (x["height"], x["width"]) and len(inst) <= 50
        assert tuple(inst.pred_masks.shape[1:]) == (x["height"], x["width"])
        assert torch.isfinite(inst.mask_scores).all()


def test_no_detection_at_all_gives_empty_instances(centermask):
    cfg, model = centermask
    model.eval()
    model.proposal_generator.pre_nms_thresh = (0.05, 1.1)  # nothing passes
    try:
        with torch.no_grad():
            out = model([{k: v for k, v in synthetic_input(64, 64, [], []).items() if k != "instances"}])
    finally:
        model.proposal_generator.pre_nms_thresh = (0.05, 0.0)
    inst = out[0]["instances"]
    assert len(inst) == 0 and inst.has("pred_masks") and inst.has("mask_scores")
