"""The probe's statistics (afigan/benchmark/study/bootstrap.py): AP recomputed from per-image
matching equals COCOeval's, an image weight equals a copy of the image, and the paired bootstrap
gives the known answer on constructed arms."""

import contextlib
import copy
import io

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from afigan.benchmark.study.bootstrap import (  # noqa: E402
    average_precision,
    bootstrap_weights,
    coco_matching,
    paired_bootstrap,
)


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _gt_dict(n_images=12, seed=0):
    """n images, 1-3 objects each, two categories; boxes and square polygons."""
    rng = np.random.RandomState(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "height": 200, "width": 200})
        for j in range(rng.randint(1, 4)):
            x, y, s = 10 + 60 * j, float(rng.randint(10, 100)), float(rng.randint(12, 50))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(rng.randint(1, 3)),
                    "bbox": [x, y, s, s],
                    "area": s * s,
                    "iscrowd": 0,
                    "segmentation": _square(x, y, s),
                }
            )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco(d):
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(d)
        c.createIndex()
    return c


def _noisy_detections(gt, seed=1, shift=6.0):
    """Per ground truth a shifted box of its category (some miss at high IoU), a few false
    positives and a few wrong-category copies; distinct scores."""
    rng = np.random.RandomState(seed)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        dx, dy = rng.uniform(-shift, shift, 2)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + dx, y + dy, w, h]})
        if rng.rand() < 0.3:
            dets.append({"image_id": a["image_id"], "category_id": 3 - a["category_id"], "bbox": [x, y, w, h]})
    for img in gt["images"]:
        if rng.rand() < 0.5:
            dets.append({"image_id": img["id"], "category_id": 1, "bbox": [150.0, 150.0, 20.0, 20.0]})
    for d in dets:
        d["score"] = float(rng.uniform(0.05, 1.0))
    return dets


def _cocoeval_ap(gt_dict, dets, iou_type="bbox"):
    gt = _coco(gt_dict)
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return 100.0 * e.stats[0]


def test_ap_from_the_matching_equals_cocoevals():
    gt = _gt_dict()
    dets = _noisy_detections(gt)
    m = coco_matching(_coco(gt), dets, "bbox", [i["id"] for i in gt["images"]])
    ours = float(average_precision(m)[0])
    assert 5.0 < ours < 95.0  # a case with misses and false positives, not a trivial 0 or 100
    assert ours == pytest.approx(_cocoeval_ap(gt, dets), abs=1e-10)


def test_an_image_weight_equals_that_many_copies_of_the_image():
    gt = _gt_dict(n_images=6, seed=3)
    dets = _noisy_detections(gt, seed=4)
    weights = np.array([[2, 0, 1, 3, 0, 1]], dtype=float)
    m = coco_matching(_coco(gt), dets, "bbox", [i["id"] for i in gt["images"]])
    # The same set with image i copied weights[i] times (new ids), and its detections with it.
    copies = {"images": [], "annotations": [], "categories": gt["categories"]}
    copied_dets = []
    for img, k in zip(gt["images"], weights[0].astype(int)):
        for c in range(k):
            new_id = 100 * img["id"] + c
            copies["images"].append(dict(img, id=new_id))
            for a in gt["annotations"]:
                if a["image_id"] == img["id"]:
                    copies["annotations"].append(dict(a, id=len(copies["annotations"]) + 1, image_id=new_id))
            copied_dets += [dict(d, image_id=new_id) for d in dets if d["image_id"] == img["id"]]
    assert float(average_precision(m, weights)[0]) == pytest.approx(_cocoeval_ap(copies, copied_dets), abs=1e-10)


def test_bootstrap_weights_draw_n_images_per_resample_reproducibly():
    w = bootstrap_weights(7, resamples=50, seed=0)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()
    assert (w == bootstrap_weights(7, resamples=50, seed=0)).all()
    assert not (w == bootstrap_weights(7, resamples=50, seed=1)).all()


def test_identical_arms_differ_by_exactly_zero():
    gt = _gt_dict()
    dets = _noisy_detections(gt)
    ids = [i["id"] for i in gt["images"]]
    m = coco_matching(_coco(gt), dets, "bbox", ids)
    out = paired_bootstrap({"ref": m, "same": coco_matching(_coco(gt), dets, "bbox", ids)}, "ref", resamples=200)
    assert out["same"]["diff"] == 0.0
    assert out["same"]["ci"] == [0.0, 0.0]
    assert out["same"]["resolved"] is False


def test_an_arm_with_more_true_positives_on_every_image_is_resolved():
    # Two squares per image; arm "both" finds both exactly, arm "one" only the first.
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    both, one = [], []
    for i in range(1, 21):
        gt["images"].append({"id": i, "file_name": f"{i}.png", "height": 200, "width": 200})
        for j, x in enumerate((10.0, 100.0)):
            box = [x, 20.0 + i, 40.0, 40.0]
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1, "bbox": box, "area": 1600.0}
            )
            gt["annotations"][-1].update(iscrowd=0, segmentation=_square(x, 20.0 + i, 40.0))
            det = {"image_id": i, "category_id": 1, "bbox": box, "score": 0.9 - 0.01 * i - 0.001 * j}
            both.append(det)
            if j == 0:
                one.append(det)
    ids = list(range(1, 21))
    coco = _coco(gt)
    out = paired_bootstrap(
        {"one": coco_matching(coco, one, "bbox", ids), "both": coco_matching(coco, both, "bbox", ids)},
        "one",
        resamples=300,
    )
    assert out["both"]["ap"] == pytest.approx(100.0)
    assert out["one"]["ap"] == pytest.approx(_cocoeval_ap(gt, one))
    assert out["both"]["diff"] > 40.0
    assert out["both"]["ci"][0] > 0 and out["both"]["resolved"] is True
    assert out["both"]["p_le_0"] == 0.0


def test_an_arm_without_detections_scores_zero():
    gt = _gt_dict(n_images=4)
    m = coco_matching(_coco(gt), [], "bbox", [1, 2, 3, 4])
    assert float(average_precision(m)[0]) == 0.0


def test_arms_matched_on_other_images_are_refused():
    gt = _gt_dict(n_images=4)
    dets = _noisy_detections(gt)
    a = coco_matching(_coco(gt), dets, "bbox", [1, 2, 3, 4])
    b = coco_matching(_coco(gt), dets, "bbox", [1, 2, 3])
    with pytest.raises(ValueError, match="other images"):
        paired_bootstrap({"a": a, "b": b}, "a", resamples=10)


def test_probe_scores_compare_every_arm_with_bilinear_and_with_afi(monkeypatch):
    pytest.importorskip("detectron2")
    from afigan.benchmark.study import probe

    monkeypatch.setattr(probe, "TASKS", ("bbox",))  # the constructed detections carry no masks
    gt = _gt_dict()
    ids = [i["id"] for i in gt["images"]]
    dets = {name: _noisy_detections(gt, seed=s) for name, s in (("bilinear", 1), ("afi", 2), ("x", 3))}
    out = probe.probe_scores(_coco(gt), dets, ids, resamples=100)["bbox"]
    assert out["afi"]["vs_afi"]["diff"] == 0.0 and out["afi"]["vs_afi"]["ci"] == [0.0, 0.0]
    assert out["x"]["vs_afi"]["diff"] == pytest.approx(out["x"]["ap"] - out["afi"]["ap"], abs=1e-12)
    assert out["bilinear"]["vs_afi"]["diff"] == pytest.approx(-out["afi"]["diff"], abs=1e-12)
    matchings = {name: coco_matching(_coco(gt), d, "bbox", ids) for name, d in dets.items()}
    assert out["x"]["vs_afi"]["ci"] == paired_bootstrap(matchings, "afi", resamples=100)["x"]["ci"]
    assert out["x"]["ci"] == paired_bootstrap(matchings, "bilinear", resamples=100)["x"]["ci"]
    without = probe.probe_scores(_coco(gt), {k: dets[k] for k in ("bilinear", "x")}, ids, resamples=20)["bbox"]
    assert all("vs_afi" not in e for e in without.values())
