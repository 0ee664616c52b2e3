"""Test-dev submissions: ``run_net --eval-only`` on a data set without annotations (COCO test-dev's
``image_info_test-dev2017.json`` layout) writes ``coco_instances_results.json`` and the COCO
server's zips instead of failing, and says where they are."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

import pycocotools.mask as mask_util  # noqa: E402
from d2_helpers import CONFIGS  # noqa: E402
from detector_helpers import one_thread  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from stage_helpers import TINY, stage_cfg  # noqa: E402

import afigan  # noqa: E402,F401  (registers components)
from afigan.checkpoint import AFICheckpointer  # noqa: E402
from afigan.data.toy_shapes import ensure_toy_dataset, toy_paths  # noqa: E402
from afigan.engine.detector import DetectorTrainer  # noqa: E402
from afigan.engine.evaluation import AFICOCOEvaluator, submission_name  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

SPLIT = "afigan_test_toy_testdev"


def image_info(src: str, dst: str) -> dict:
    """``src`` (a COCO instances json) without its annotations, written to ``dst``."""
    data = json.load(open(src))
    del data["annotations"]
    with open(dst, "w") as f:
        json.dump(data, f)
    return data


@pytest.fixture(scope="module")
def testdev(tmp_path_factory):
    """The toy val images as an annotation-free split named like COCO's test-dev file."""
    root = tmp_path_factory.mktemp("toy") / "afigan_toy"
    ensure_toy_dataset(str(root), num_train=4, num_val=2, seed=1)
    val_json, val_images = toy_paths(str(root), "val")
    path = str(root / "annotations" / "image_info_toy-dev2017.json")
    data = image_info(val_json, path)
    if SPLIT not in DatasetCatalog.list():
        register_coco_instances(SPLIT, {}, path, val_images)
    return path, data


def read_zip(path: str):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        return names, json.loads(z.read(names[0]))


def test_run_net_eval_only_writes_the_results_and_the_server_zips(tool, testdev, tmp_path):
    json_file, data = testdev
    out = tmp_path / "mask_rcnn_toy"
    cfg = stage_cfg("toy/pipeline/stage3.yaml", str(out))
    AFICheckpointer(DetectorTrainer.build_model(cfg), str(out)).save("model_final")  # an untrained Mask R-CNN
    code, err, log = tool(
        "run_net",
        "--eval-only",
        "--config-file",
        os.path.join(CONFIGS, "toy/pipeline/stage3.yaml"),
        *TINY,
        "OUTPUT_DIR",
        out,
        "DATASETS.TEST",
        f"('{SPLIT}',)",
        "MODEL.WEIGHTS",
        out / "model_final.pth",
        "TEST.DETECTIONS_PER_IMAGE",
        20,
    )
    assert code == 0, err[-3000:]
    folder = out / "inference" / SPLIT
    results = json.load(open(folder / "coco_instances_results.json"))
    image_ids = {im["id"] for im in data["images"]}
    assert results and {r["image_id"] for r in results} <= image_ids
    assert {r["category_id"] for r in results} <= {c["id"] for c in data["categories"]}
    name = "detections_toy-dev2017_mask-rcnn-toy_results"
    zips = {t: folder / "submission" / t / f"{name}.zip" for t in ("bbox", "segm")}
    # One json per zip, named as the server wants; bbox without masks, segm without boxes.
    for task, path in zips.items():
        names, entries = read_zip(str(path))
        assert names == [f"{name}.json"] and len(entries) == len(results)
        assert [e["score"] for e in entries] == [r["score"] for r in results]
        assert all(("bbox" in e) == (task == "bbox") and ("segmentation" in e) == (task == "segm") for e in entries)
    # The server's side: pycocotools reads each file against the image info (image ids it knows).
    for task, path in zips.items():
        gt = COCO(json_file)
        assert len(gt.loadRes(read_zip(str(path))[1]).anns) == len(results)
    assert f"submit {zips['bbox']} and {zips['segm']} to the COCO evaluation server" in log
    assert f"{SPLIT} has no annotations" in log


@pytest.fixture
def annotation_free_square(tmp_path):
    path = tmp_path / "image_info_test-dev2017.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 20}],
                "categories": [{"id": 5, "name": "square"}],
            }
        )
    )
    name = f"afigan_test_square_{abs(hash(str(tmp_path)))}"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    DatasetCatalog.get(name)  # sets the category id mapping, as the test loader does
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_centermask_submission_ranks_masks_by_mask_score(annotation_free_square, tmp_path, capsys):
    inst = Instances((20, 20))
    inst.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 12.0, 12.0]]))
    inst.scores, inst.pred_classes, inst.mask_scores = torch.tensor([0.9]), torch.tensor([0]), torch.tensor([0.3])
    mask = np.zeros((1, 20, 20), dtype=bool)
    mask[0, 2:12, 2:12] = True
    inst.pred_masks = torch.from_numpy(mask)
    ev = AFICOCOEvaluator(
        annotation_free_square,
        output_dir=str(tmp_path / "eval"),
        distributed=False,
        use_mask_scores=True,
        submission_alg="centermask_R_50_BiFPN",
    )
    ev.reset()
    ev.process([{"image_id": 7}], [{"instances": inst}])
    assert ev.evaluate() == {}  # nothing to score here
    base = tmp_path / "eval" / "submission"
    name = "detections_test-dev2017_centermask-R-50-BiFPN_results"
    (_, [box]), (_, [seg]) = read_zip(str(base / "bbox" / f"{name}.zip")), read_zip(str(base / "segm" / f"{name}.zip"))
    assert box["score"] == pytest.approx(0.9) and seg["score"] == pytest.approx(0.3)
    assert box["category_id"] == seg["category_id"] == 5 and box["image_id"] == seg["image_id"] == 7
    assert box["bbox"] == pytest.approx([2.0, 2.0, 10.0, 10.0]) and mask_util.area(seg["segmentation"]) == 100
    assert "1 detections on 1 images" in capsys.readouterr().out


def test_submission_names_follow_the_server():
    # [type]_[testset]_[alg]_results: "_" separates the fields, so the algorithm name has none.
    assert (
        submission_name(
            "datasets/coco/annotations/image_info_test-dev2017.json",
            "coco_2017_test-dev",
            "AFI-GAN_cascade_mask_rcnn_S101",
        )
        == "detections_test-dev2017_AFI-GAN-cascade-mask-rcnn-S101_results"
    )
    assert submission_name("x/unlabeled.json", "my_set", "a.b") == "detections_my-set_a-b_results"
    # Detectron2 registers COCO test-dev with its image-info file: the submission says test-dev2017.
    meta = MetadataCatalog.get("coco_2017_test-dev")
    assert os.path.basename(meta.json_file) == "image_info_test-dev2017.json"
    assert submission_name(meta.json_file, "coco_2017_test-dev", "run").startswith("detections_test-dev2017_")
