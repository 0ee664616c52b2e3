"""The study's detection probe (afigan/benchmark/study/probe.py): its arm "full" is the detector's
own inference and scores what Detectron2's COCOEvaluator scores on the same images; an upsampling
arm gives the heads every level at the full-resolution size."""

import json

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from afigan.benchmark.study.fidelity import fixed_x2  # noqa: E402
from afigan.benchmark.study.probe import (  # noqa: E402
    FULL,
    HALF,
    load_detector,
    probe_detections,
    probe_scores,
    upsampled_arm,
)
from afigan.modeling.meta_arch import build_guide_model  # noqa: E402

IMAGES = 4
OPTS = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "('afigan_toy_val',)", "INPUT.MIN_SIZE_TEST", "128"]
OPTS += ["INPUT.MAX_SIZE_TEST", "160", "TEST.DETECTIONS_PER_IMAGE", "20"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A randomly initialised toy stage-0 Mask R-CNN, saved and loaded as the probe loads the teacher.
    Its class logits are spread out so that scores differ and some boxes pass the test threshold."""
    from afigan.config import load_config
    from afigan.engine.detector import DetectorTrainer

    config = f"{CONFIGS}/toy/pipeline/stage0.yaml"
    torch.manual_seed(0)
    model = DetectorTrainer.build_model(load_config(config, OPTS))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("probe") / "teacher.pth")
    torch.save({"model": model.state_dict()}, path)
    return load_detector(config, path, OPTS)


def _self_labelled_set(name, dets, json_file, path):
    """A data set of the same images whose ground truth is each image's three best detections of
    the detector itself (masks as RLE): its AP is neither 0 nor 100 (the other detections are
    false positives), so the equality below compares real numbers."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json
    from pycocotools import mask as mask_util

    gt = json.load(open(json_file))
    ids = {d["image_id"] for d in dets}
    anns = []
    for i in sorted(ids):
        for d in sorted((d for d in dets if d["image_id"] == i), key=lambda d: -d["score"])[:3]:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": d["category_id"],
                    "bbox": d["bbox"],
                    "area": float(mask_util.area(dict(d["segmentation"], counts=d["segmentation"]["counts"].encode()))),
                    "iscrowd": 0,
                    "segmentation": d["segmentation"],
                }
            )
    gt.update(images=[im for im in gt["images"] if im["id"] in ids], annotations=anns)
    path.write_text(json.dumps(gt))
    root = MetadataCatalog.get("afigan_toy_val").image_root
    DatasetCatalog.register(name, lambda: load_coco_json(str(path), root, name))
    MetadataCatalog.get(name).set(
        json_file=str(path), image_root=root, thing_classes=MetadataCatalog.get("afigan_toy_val").thing_classes
    )
    return name


def test_the_full_arm_is_the_detectors_own_evaluation(detector, tmp_path):
    cfg, model = detector
    dets, fallback, ids = probe_detections(model, cfg, "afigan_toy_val", {FULL: None}, IMAGES)
    assert len(ids) == IMAGES and fallback == {}
    json_file = MetadataCatalog.get("afigan_toy_val").json_file
    data = _self_labelled_set(f"probe_self_{tmp_path.name}", dets[FULL], json_file, tmp_path / "gt.json")
    dets, _, ids = probe_detections(model, cfg, data, {FULL: None})
    # Detectron2 itself: its test loader and mapper, the model's forward, COCOEvaluator.
    evaluator = COCOEvaluator(data, tasks=("bbox", "segm"), output_dir=str(tmp_path))
    theirs = inference_on_dataset(model, build_detection_test_loader(cfg, data), evaluator)
    own = sorted(evaluator._predictions, key=lambda p: p["image_id"])  # what it scored, per image
    assert [p["image_id"] for p in own] == ids
    ours = dets[FULL]
    flat = [d for p in own for d in p["instances"]]
    assert len(ours) == len(flat) > 3 * IMAGES
    for a, b in zip(ours, flat):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["segmentation"]["counts"] == b["segmentation"]["counts"]
    scores = probe_scores(COCO(MetadataCatalog.get(data).json_file), dets, ids, resamples=20)
    for task in ("bbox", "segm"):
        assert 1.0 < theirs[task]["AP"] < 100.0
        assert scores[task][FULL]["ap"] == pytest.approx(theirs[task]["AP"], abs=1e-6)
        assert scores[task][FULL]["diff"] == 0.0  # the only arm is its own reference


def test_an_upsampling_arm_fills_every_level_at_the_full_size():
    low_sizes = {"p2": (12, 17), "p3": (6, 9), "p4": (3, 5), "p5": (2, 3), "p6": (1, 2)}
    # Odd full-resolution sizes: x2 is cropped (p2: 24x34 -> 23x33), or edge-padded (p4: 6 -> 7 rows).
    full_sizes = {"p2": (23, 33), "p3": (12, 17), "p4": (7, 9), "p5": (3, 5), "p6": (2, 3)}
    low = {l: torch.randn(1, 4, *s) for l, s in low_sizes.items()}
    full = {l: torch.randn(1, 4, *s) for l, s in full_sizes.items()}

    def guided_like(low):  # predicts every level but p2, as a guided kind does
        return {l: torch.ones(1, 4, 2 * v.shape[-2], 2 * v.shape[-1]) for l, v in low.items() if l != "p2"}

    feats, fallback = upsampled_arm(guided_like)(low, full)
    assert fallback == ["p2"]
    assert {l: tuple(v.shape[-2:]) for l, v in feats.items()} == full_sizes
    assert (feats["p4"] == 1).all()  # the arm's own prediction, padded with its edge values
    bil = fixed_x2("bilinear", ["p2"])(low)["p2"]
    assert torch.equal(feats["p2"], bil[..., :23, :33])  # p2 falls back to bilinear x2


def test_the_probes_pyramids_are_stage_ones(detector):
    # The half-size pyramid the probe upsamples is the one stage 1 trains G on: the teacher model of
    # stages 1-2 (its backbone only) on the mapper's half-size image.
    cfg, model = detector
    from afigan.config import lr_key
    from afigan.data.hr_lr_mapper import HRLRDatasetMapper

    batch = next(iter(build_detection_test_loader(cfg, "afigan_toy_val", mapper=HRLRDatasetMapper(cfg, False))))
    teacher_cfg = cfg.clone()
    teacher_cfg.defrost()
    teacher_cfg.MODEL.GUIDE_WEIGHTS = cfg.MODEL.WEIGHTS
    teacher = build_guide_model(teacher_cfg)
    key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
    with torch.no_grad():
        low = model.backbone(model.preprocess_image([{"image": x[key]} for x in batch]).tensor)
        ref = teacher(batch, key)
    assert set(low) == set(ref)
    for l in low:
        assert torch.equal(low[l], ref[l])
    _, _, ids = probe_detections(model, cfg, "afigan_toy_val", {HALF: None}, 1)
    assert ids == [batch[0]["image_id"]]
