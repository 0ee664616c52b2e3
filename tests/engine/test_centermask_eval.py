"""CenterMask's masks in segm AP ranked by their mask scores (score x predicted mask IoU), as
CenterMask2's evaluator does: a hand-built case scored with pycocotools, and the evaluator that
run_net / stage 3 build for each kind of config."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

import pycocotools.mask as mask_util  # noqa: E402
from d2_helpers import make_cfg  # noqa: E402
from detector_helpers import mapped, one_thread, toy_dicts  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)
from afigan.engine.detector import DetectorTrainer  # noqa: E402
from afigan.engine.evaluation import AFICOCOEvaluator  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

SIZE = 20
GT_BOX = [2.0, 2.0, 12.0, 12.0]  # XYXY: the object is the 10 x 10 square of rows and columns 2..11


def square(x0: int, y0: int, side: int = 10) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


@pytest.fixture(scope="module")
def one_object(tmp_path_factory):
    """A registered data set: one 20 x 20 image holding one square (category 1), as an RLE."""
    folder = tmp_path_factory.mktemp("one_object")
    rle = mask_util.encode(np.asfortranarray(square(2, 2).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE}],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [2.0, 2.0, 10.0, 10.0],
                "segmentation": rle,
            }
        ],
    }
    path = folder / "instances_one.json"
    path.write_text(json.dumps(data))
    name = "afigan_test_centermask_one_object"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(path), str(folder))
    DatasetCatalog.get(name)  # loading sets the category id mapping, as the test loader does before evaluation
    return name


def two_predictions():
    """A: the right box, a wrong mask (IoU 0.18), score 0.9, mask score 0.2.
    B: a wrong box (IoU 0.05), the right mask, score 0.6, mask score 0.55."""
    inst = Instances((SIZE, SIZE))
    inst.pred_boxes = Boxes(torch.tensor([GT_BOX, [9.0, 9.0, 19.0, 19.0]]))
    inst.scores = torch.tensor([0.9, 0.6])
    inst.pred_classes = torch.tensor([0, 0])
    inst.pred_masks = torch.from_numpy(np.stack([square(9, 2), square(2, 2)]))
    inst.mask_scores = torch.tensor([0.2, 0.55])
    return inst


def evaluate(name, out_dir, inst, **kwargs):
    ev = AFICOCOEvaluator(name, output_dir=str(out_dir), distributed=False, **kwargs)
    ev.reset()
    ev.process([{"image_id": 1, "height": SIZE, "width": SIZE}], [{"instances": inst}])
    return ev.evaluate()


def test_ranking_masks_by_mask_score_changes_segm_ap_as_expected(one_object, tmp_path):
    # By box score A's mask comes first: a false positive ahead of the true one, AP 50. By mask score
    # B's comes first, AP 100. Box AP ranks by the box score either way: A's box first, AP 100 (by
    # mask score it would be 50).
    plain = evaluate(one_object, tmp_path / "plain", two_predictions())
    ranked = evaluate(one_object, tmp_path / "ranked", two_predictions(), use_mask_scores=True)
    assert plain["segm"]["AP"] == pytest.approx(50.0) and ranked["segm"]["AP"] == pytest.approx(100.0)
    assert plain["bbox"]["AP"] == pytest.approx(100.0) and ranked["bbox"]["AP"] == pytest.approx(100.0)
    # Mask scores that agree with the box scores change nothing.
    agree = two_predictions()
    agree.mask_scores = torch.tensor([0.8, 0.1])
    assert evaluate(one_object, tmp_path / "agree", agree, use_mask_scores=True)["segm"]["AP"] == pytest.approx(50.0)
    # The results file keeps both scores of each detection, with the data set's category ids.
    saved = json.load(open(tmp_path / "ranked" / "coco_instances_results.json"))
    assert [(r["score"], r["mask_score"], r["category_id"]) for r in saved] == [
        (pytest.approx(0.9), pytest.approx(0.2), 1),
        (pytest.approx(0.6), pytest.approx(0.55), 1),
    ]
    assert all("mask_score" not in r for r in json.load(open(tmp_path / "plain" / "coco_instances_results.json")))


def test_predictions_without_mask_scores_rank_by_score(one_object, tmp_path):
    inst = two_predictions()
    inst.remove("mask_scores")
    res = evaluate(one_object, tmp_path, inst, use_mask_scores=True)
    assert res["segm"]["AP"] == pytest.approx(50.0) and res["bbox"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "config, mask_scores",
    [
        ("toy/detectors/centermask_R_50_BiFPN_toy_afi.yaml", True),
        ("toy/detectors/centermask_R_50_BiFPN_toy_nn.yaml", True),
        ("toy/detectors/mask_rcnn_R_50_FPN_toy_afi.yaml", False),
    ],
)
def test_run_net_evaluator_ranks_centermask_masks_by_mask_score(config, mask_scores, one_object, tmp_path):
    cfg = make_cfg(config, "OUTPUT_DIR", str(tmp_path / "run"))
    ev = DetectorTrainer.build_evaluator(cfg, one_object)
    assert isinstance(ev, AFICOCOEvaluator) and ev._use_mask_scores is mask_scores
    assert ev._output_dir == str(tmp_path / "run" / "inference" / one_object)
    off = make_cfg(config, "MODEL.MASKIOU_ON", False)
    assert DetectorTrainer.build_evaluator(off, one_object, str(tmp_path))._use_mask_scores is False


def test_centermask_outputs_reach_the_results_with_their_mask_scores(one_object, tmp_path):
    cfg = make_cfg(
        "toy/detectors/centermask_R_50_BiFPN_toy_afi.yaml",
        "MODEL.FCOS.INFERENCE_TH_TEST",
        0.0,
        "OUTPUT_DIR",
        str(tmp_path),
    )
    model = build_model(cfg).eval()
    inputs = mapped(cfg, toy_dicts(str(tmp_path / "afigan_toy"), "val")[:1], is_train=False)
    with torch.no_grad():
        outputs = model(inputs)
    inst = outputs[0]["instances"]
    assert len(inst) > 0
    ev = DetectorTrainer.build_evaluator(cfg, one_object, str(tmp_path / "eval"))  # process() reads no ground truth
    ev.reset()
    ev.process(inputs, outputs)
    results = ev._predictions[0]["instances"]
    assert [r["mask_score"] for r in results] == pytest.approx(inst.mask_scores.tolist())
    assert [r["score"] for r in results] == pytest.approx(inst.scores.tolist())
    assert all(0 <= r["mask_score"] <= r["score"] for r in results)
