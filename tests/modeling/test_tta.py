"""Multi-scale / flip testing (TEST.AUG.*): Detectron2's GeneralizedRCNNWithTTA for the R-CNN
detectors with every afigan neck, afigan's OneStageWithTTA for FCOS and CenterMask
(afigan/modeling/test_time_augmentation.py), and the trainer's TTA evaluation
(afigan/engine/detector.py). Random-weight toy models at ~100 px."""

import numpy as np
import pytest

pytest.importorskip("detectron2")

import detectron2.data.transforms as T  # noqa: E402
import torch  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA, build_model  # noqa: E402

from afigan.modeling.test_time_augmentation import OneStageWithTTA, build_tta_model, is_one_stage  # noqa: E402

SMALL = [
    "INPUT.MIN_SIZE_TEST",
    96,
    "INPUT.MAX_SIZE_TEST",
    160,
    "MODEL.FCOS.INFERENCE_TH_TEST",
    0.005,
    "TEST.DETECTIONS_PER_IMAGE",
    50,
]
CASES = {
    "mask_rcnn_fpn": "toy/fpn_toy.yaml",
    "mask_rcnn_pafpn": "toy/pafpn_toy.yaml",
    "mask_rcnn_bifpn": "toy/bifpn_toy.yaml",
    "cascade_mask_rcnn_pafpn": "toy/detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml",
    "cascade_rcnn_swin_bifpn": "toy/detectors/cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml",
    "fcos_fpn": "toy/detectors/fcos_R_50_FPN_toy_afi.yaml",
    "fcos_bifpn": "toy/detectors/fcos_R_50_BiFPN_toy_afi.yaml",
    "centermask_bifpn": "toy/detectors/centermask_R_50_BiFPN_toy_afi.yaml",
}
ONE_STAGE = {"fcos_fpn", "fcos_bifpn", "centermask_bifpn"}


def _image(seed=0, h=131, w=197):
    """A noisy image with a few bright rectangles (so detections differ between scales)."""
    g = np.random.RandomState(seed)
    img = g.randint(0, 80, size=(h, w, 3)).astype(np.uint8)
    for y, x, s in ((20, 30, 40), (70, 120, 50), (10, 150, 25)):
        img[y : y + s, x : x + s] = g.randint(150, 256, size=3)
    return img


def _input(cfg, img):
    """The test loader's input: the image resized to INPUT.MIN_SIZE_TEST, original height/width."""
    h, w = img.shape[:2]
    resized = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(img).apply_image(img)
    return {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": h, "width": w}


def _model(config, *opts):
    cfg = make_cfg(config, *SMALL, *opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if "rcnn" in config and "centermask" not in config:
        # Random box heads score every class about equally; a spread makes score order (and NMS) meaningful.
        for m in model.roi_heads.modules():
            if hasattr(m, "cls_score"):
                torch.nn.init.normal_(m.cls_score.weight, std=3e-4)
    return cfg, model


def _sorted(inst):
    return inst[torch.argsort(inst.scores, descending=True, stable=True)]


def _run(cfg, model, inputs, sizes, flip):
    cfg = cfg.clone()
    cfg.merge_from_list(
        ["TEST.AUG.MIN_SIZES", tuple(sizes), "TEST.AUG.MAX_SIZE", cfg.INPUT.MAX_SIZE_TEST, "TEST.AUG.FLIP", flip]
    )
    with torch.no_grad():
        return [o["instances"] for o in build_tta_model(cfg, model)(inputs)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_scale_without_flip_equals_the_plain_model(case):
    cfg, model = _model(CASES[case])
    inputs = [_input(cfg, _image(0)), _input(cfg, _image(1, 150, 120))]
    wrapper = build_tta_model(cfg, model)
    assert isinstance(wrapper, OneStageWithTTA if case in ONE_STAGE else GeneralizedRCNNWithTTA)
    with torch.no_grad():
        # One image per forward, as the wrapper runs them: ResNeSt's split attention and Swin see
        # the batch's padding.
        plain = [model([x])[0]["instances"] for x in inputs]
    tta = _run(cfg, model, inputs, [cfg.INPUT.MIN_SIZE_TEST], False)
    for p, t, x in zip(plain, tta, inputs):
        assert len(p) > 0
        p, t = _sorted(p), _sorted(t)
        assert t.image_size == p.image_size == (x["height"], x["width"])
        assert len(t) == len(p)
        assert torch.equal(t.pred_classes, p.pred_classes)
        assert torch.allclose(t.scores, p.scores, atol=1e-6)
        # Boxes go back to the original image by the transforms' inverse instead of the model's
        # scale factors: float rounding only.
        assert torch.allclose(t.pred_boxes.tensor, p.pred_boxes.tensor, atol=1e-3)
        if p.has("pred_masks"):
            assert t.pred_masks.shape == p.pred_masks.shape
            assert (t.pred_masks != p.pred_masks).float().mean() < 1e-3
        if p.has("mask_scores"):
            assert torch.allclose(t.mask_scores, p.mask_scores, atol=1e-5)


def _hflip(x):
    return dict(x, image=x["image"].flip(dims=[2]))


def _iou(box, boxes):
    """IoU of one XYXY box with each of ``boxes``."""
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return w * h / (area(box) + area(boxes) - w * h)


def _merge_by_hand(parts, thresh, top_k):
    """The documented merge: the union of every augmented image's detections (already in the
    original image), greedy class-aware NMS (highest score first; a box overlapping a kept box
    of its class by IoU > ``thresh`` is dropped), the ``top_k`` best kept."""
    boxes = torch.cat([p.pred_boxes.tensor for p in parts])
    scores = torch.cat([p.scores for p in parts])
    classes = torch.cat([p.pred_classes for p in parts])
    keep = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        same = [j for j in keep if classes[j] == classes[i]]
        if not same or float(_iou(boxes[i], boxes[same]).max()) <= thresh:
            keep.append(i)
    keep = keep[:top_k]
    return boxes[keep], scores[keep], classes[keep]


def _by_hand(cfg, model, x, sizes, flip):
    """Each augmentation run through the plain model on its own (height/width = the original's, so
    its boxes come back scaled to the original image; a flipped image's boxes mirrored back), then
    merged by hand at the merge's NMS threshold and detection count."""
    img = x["image"].permute(1, 2, 0).numpy()
    width = x["width"]
    parts = []
    for s in sizes:
        resized = T.ResizeShortestEdge(s, cfg.INPUT.MAX_SIZE_TEST).get_transform(img).apply_image(img)
        for f in (False, True) if flip else (False,):
            image = torch.as_tensor(np.ascontiguousarray((resized[:, ::-1] if f else resized).transpose(2, 0, 1)))
            with torch.no_grad():
                (out,) = model([dict(x, image=image)])
            inst = out["instances"]
            if f:
                b = inst.pred_boxes.tensor
                inst.pred_boxes.tensor = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
            parts.append(inst)
    if isinstance(model, GeneralizedRCNN) and not is_one_stage(model):  # Detectron2's box-head merge
        thresh, top_k = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE
    else:  # FCOS's own post-processing
        thresh, top_k = cfg.MODEL.FCOS.NMS_TH, cfg.MODEL.FCOS.POST_NMS_TOPK_TEST
    return parts, _merge_by_hand(parts, thresh, top_k)


def _run_one_by_one(cfg, model, x, sizes, flip):
    """The TTA wrapper on ``x``, one augmented image per forward (as the plain model runs them by hand)."""
    cfg = cfg.clone()
    cfg.merge_from_list(
        ["TEST.AUG.MIN_SIZES", tuple(sizes), "TEST.AUG.MAX_SIZE", cfg.INPUT.MAX_SIZE_TEST, "TEST.AUG.FLIP", flip]
    )
    wrapper = (OneStageWithTTA if is_one_stage(model) else GeneralizedRCNNWithTTA)(cfg, model, batch_size=1)
    with torch.no_grad():
        return wrapper([x])[0]["instances"]


@pytest.mark.parametrize("case", ["mask_rcnn_pafpn", "cascade_mask_rcnn_pafpn", "fcos_fpn", "centermask_bifpn"])
def test_flips_and_scales_merge_to_the_nms_of_the_parts(case):
    cfg, model = _model(CASES[case])
    x = _input(cfg, _image(2))
    size = cfg.INPUT.MIN_SIZE_TEST
    for sizes, flip in (([size], True), ([size, size + 32], True)):
        parts, (boxes, scores, classes) = _by_hand(cfg, model, x, sizes, flip)
        merged = _sorted(_run_one_by_one(cfg, model, x, sizes, flip))
        assert len(parts) == 2 * len(sizes) and all(len(p) > 0 for p in parts)
        # Merging removed duplicates: the augmented images found boxes on the same rectangles.
        assert 0 < len(merged) == len(boxes) < sum(len(p) for p in parts)
        assert torch.equal(merged.pred_classes, classes)
        torch.testing.assert_close(merged.scores, scores)
        torch.testing.assert_close(merged.pred_boxes.tensor, boxes, atol=1e-3, rtol=0)
        if case == "centermask_bifpn":
            assert merged.pred_masks.shape == (len(merged), x["height"], x["width"])
            assert (
                merged.has("mask_scores")
                and 0 <= float(merged.mask_scores.min()) <= float(merged.mask_scores.max()) <= 1
            )
    # The wrapper as built (three augmented images per forward): within the detection count and the image.
    (multi,) = _run(cfg, model, [x], [size, size + 32], True)
    limit = cfg.MODEL.FCOS.POST_NMS_TOPK_TEST if case in ONE_STAGE else cfg.TEST.DETECTIONS_PER_IMAGE
    assert 0 < len(multi) <= limit
    b = multi.pred_boxes.tensor
    assert b[:, 0].min() >= 0 and b[:, 2].max() <= x["width"] and b[:, 3].max() <= x["height"]


def test_flipped_image_alone_gives_the_plain_model_on_the_mirror_image():
    """The flip's inverse is applied: FCOS on a mirrored image, mapped back, equals TTA with the flip only."""
    from detectron2.data.transforms import HFlipTransform, TransformList

    cfg, model = _model(CASES["fcos_fpn"])
    x = _input(cfg, _image(3))
    w = x["width"]

    def flip_only(d):
        d = dict(d, image=d["image"].flip(dims=[2]))
        # As DatasetMapperTTA: the input is already resized, so the inverse also undoes that resize.
        d["transforms"] = TransformList(
            [T.ResizeTransform(x["height"], w, *x["image"].shape[1:3]), HFlipTransform(x["image"].shape[2])]
        )
        return [d]

    with torch.no_grad():
        (mirror,) = [o["instances"] for o in model([_hflip(x)])]
        (tta,) = [o["instances"] for o in OneStageWithTTA(cfg, model, tta_mapper=flip_only)([x])]
    mirror, tta = _sorted(mirror), _sorted(tta)
    assert len(tta) == len(mirror) > 0
    b = mirror.pred_boxes.tensor
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    assert torch.allclose(tta.pred_boxes.tensor, expected, atol=1e-2)


def test_detectors_without_tta_stop_with_one_sentence():
    cfg, model = _model("toy/detectors/retinanet_R_50_FPN_toy_afi.yaml")
    with pytest.raises(ValueError, match=r"^TEST\.AUG\.ENABLED: RetinaNet .* set TEST\.AUG\.ENABLED False\.$"):
        build_tta_model(cfg, model)


@pytest.fixture(scope="module")
def tta_toy(tmp_path_factory):
    from afigan.data.datasets import register_toy_dataset
    from afigan.data.toy_shapes import make_toy_dataset

    root = make_toy_dataset(
        str(tmp_path_factory.mktemp("toy") / "afigan_toy"), num_train=2, num_val=2, seed=1, num_unlabeled=0
    )
    register_toy_dataset(root, prefix="tta_toy")
    return [
        "DATASETS.TRAIN",
        ("tta_toy_train",),
        "DATASETS.TEST",
        ("tta_toy_val",),
        "TEST.AUG.ENABLED",
        True,
        "TEST.AUG.MIN_SIZES",
        (96, 128),
        "TEST.AUG.MAX_SIZE",
        160,
        "TEST.AUG.FLIP",
        True,
    ]


def test_training_ends_with_a_tta_evaluation_under_its_own_names(tta_toy, tmp_path):
    import os

    from stage_helpers import stage_cfg

    from afigan.engine.detector import DetectorTrainer

    cfg = stage_cfg(
        "toy/detectors/fcos_R_50_FPN_toy_afi.yaml",
        str(tmp_path),
        *tta_toy,
        "SOLVER.MAX_ITER",
        1,
        "MODEL.FCOS.INFERENCE_TH_TEST",
        0.005,
    )
    trainer = DetectorTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert sorted(trainer._last_eval_results) == ["bbox", "bbox_TTA"]
    assert os.path.isfile(os.path.join(str(tmp_path), "inference_TTA", "tta_toy_val", "coco_instances_results.json"))


def test_eval_of_a_mask_model_adds_tta_results_for_boxes_and_masks(tta_toy, tmp_path):
    from stage_helpers import stage_cfg

    from afigan.engine.detector import DetectorTrainer

    cfg = stage_cfg("toy/detectors/cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml", str(tmp_path), *tta_toy)
    res = DetectorTrainer.evaluate(cfg, build_model(cfg).eval())
    assert sorted(res) == ["bbox", "bbox_TTA", "segm", "segm_TTA"]
    assert all("AP" in res[k] for k in res)


def test_a_detector_without_tta_stops_before_training(tta_toy, tmp_path):
    from stage_helpers import stage_cfg

    from afigan.engine.detector import DetectorTrainer

    cfg = stage_cfg("toy/detectors/retinanet_R_50_FPN_toy_afi.yaml", str(tmp_path), *tta_toy)
    with pytest.raises(ValueError, match="TEST.AUG.ENABLED"):
        DetectorTrainer(cfg)
