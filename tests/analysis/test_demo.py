"""tools/demo.py (afigan/analysis/predict.py): drawings and COCO-results JSON for every detector
kind afigan ships, image ids and category ids of the data set, the confidence threshold, and one
line per unreadable file. Random-weight toy models at ~100 px."""

import ast
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

pytest.importorskip("detectron2")

from detector_helpers import ROOT, one_thread  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402

from afigan.analysis.predict import (  # noqa: E402
    SCORE_THRESHOLD_KEYS,
    demo_main,
    demo_parser,
    setup_predict_cfg,
    split_overrides,
)
from afigan.data.toy_shapes import ensure_toy_dataset, toy_paths  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

# The data set's own ids differ from the model's contiguous class indices (0, 1, 2) and from the
# images' positions in the input list, so a wrong mapping cannot pass by coincidence.
CATEGORY_IDS = {1: 5, 2: 7, 3: 9}  # toy id -> id in the test's JSON
IMAGE_ID_OFFSET = 100
SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A two-image toy set whose JSON uses category ids 5/7/9 and image ids 101, 102, registered
    with Detectron2's register_coco_instances (so its category mapping exists only once loaded)."""
    root = ensure_toy_dataset(str(tmp_path_factory.mktemp("toy") / "afigan_toy"), num_train=2, num_val=2, seed=3)
    names, ids = {}, {}
    for split in ("train", "val"):
        json_file, image_root = toy_paths(root, split)
        data = json.load(open(json_file))
        for c in data["categories"]:
            c["id"] = CATEGORY_IDS[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = CATEGORY_IDS[a["category_id"]]
            a["image_id"] += IMAGE_ID_OFFSET
        for im in data["images"]:
            im["id"] += IMAGE_ID_OFFSET
            if split == "val":
                ids[os.path.join(image_root, im["file_name"])] = im["id"]
        renumbered = json_file.replace(".json", "_renumbered.json")
        json.dump(data, open(renumbered, "w"))
        names[split] = f"demo_toy_{split}_{uuid.uuid4().hex[:8]}"
        register_coco_instances(names[split], {}, renumbered, image_root)
    assert sorted(ids.values()) == [IMAGE_ID_OFFSET + 1, IMAGE_ID_OFFSET + 2]
    return {"root": root, "train": names["train"], "val": names["val"], "ids": ids}


def _demo(config, inputs, out, threshold, dataset, *opts, seed=0):
    torch.manual_seed(seed)  # the same random weights for every call with the same seed
    argv = [
        "--config-file",
        os.path.join(ROOT, config),
        "--input",
        *inputs,
        "--output",
        str(out),
        "--confidence-threshold",
        str(threshold),
        *SMALL,
        "DATASETS.TRAIN",
        f"('{dataset['train']}',)",
        "DATASETS.TEST",
        f"('{dataset['val']}',)",
        *map(str, opts),
    ]
    return demo_main(argv)


def _load(out):
    with open(os.path.join(out, "predictions.json")) as f:
        return json.load(f)


MASK_RCNN = "configs/toy/detectors/mask_rcnn_R_50_FPN_toy_afi.yaml"
RETINANET = "configs/toy/detectors/retinanet_R_50_FPN_toy_afi.yaml"


def test_two_images_and_an_unreadable_file(tmp_path, dataset, capsys):
    (first, first_id), (second, _) = sorted(dataset["ids"].items())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = str(elsewhere / "copy.png")  # the same picture, but not a file of the data set
    shutil.copy(second, copy)
    bad = str(elsewhere / "broken.png")
    open(bad, "w").write("not an image")
    out = tmp_path / "out"
    n = 4
    result = _demo(MASK_RCNN, [first, bad, copy], out, 0.05, dataset, "TEST.DETECTIONS_PER_IMAGE", n)

    assert sorted(os.listdir(out)) == sorted([os.path.basename(first), "copy.png", "predictions.json"])
    assert all(os.path.getsize(p) > 1000 for p in result["images"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and "Cannot read image" in lines[0], err[-2000:]
    assert result["unreadable"] == [bad]

    preds = _load(out)
    by_image = {}
    for p in preds:
        by_image.setdefault(p["image_id"], []).append(p)
    # The data set's id for its file (101/102), the input position (2) for the copy.
    assert set(by_image) == {first_id, 2}
    assert {p["file_name"] for p in by_image[2]} == {copy}
    assert all(0 < len(v) <= n for v in by_image.values())
    assert {p["category_id"] for p in preds} <= set(CATEGORY_IDS.values())
    for p in preds:
        assert p["score"] >= 0.05 and len(p["bbox"]) == 4 and p["bbox"][2] > 0 and p["bbox"][3] > 0
        assert set(p["segmentation"]) == {"size", "counts"} and isinstance(p["segmentation"]["counts"], str)


def test_confidence_threshold_is_respected(tmp_path, dataset):
    # RetinaNet: a random-weight model's sigmoid scores are spread out (~0.01-0.1), while a random
    # R-CNN box head's softmax saturates at ties near 1.0.
    image = sorted(dataset["ids"])[0]
    _demo(RETINANET, [image], tmp_path / "low", 0.0, dataset, "TEST.DETECTIONS_PER_IMAGE", 30)
    scores = sorted((p["score"] for p in _load(tmp_path / "low")), reverse=True)
    assert len(scores) == 30 and scores[0] > scores[-1]
    cut = (scores[9] + scores[10]) / 2 if scores[9] > scores[10] else scores[0]  # keeps the ten best
    _demo(RETINANET, [image], tmp_path / "high", cut, dataset, "TEST.DETECTIONS_PER_IMAGE", 30)
    high = sorted((p["score"] for p in _load(tmp_path / "high")), reverse=True)
    assert all(s >= cut for s in high)
    # Same weights (same seed): exactly the detections of the low run that pass the cut.
    assert high == pytest.approx([s for s in scores if s >= cut]) and 0 < len(high) < len(scores)


def test_threshold_reaches_every_detector_kind_key():
    cfg = setup_predict_cfg(
        os.path.join(ROOT, "configs/toy/detectors/fcos_R_50_FPN_toy_afi.yaml"),
        ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.9"],
        0.37,
    )
    for key in SCORE_THRESHOLD_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(0.37), key  # also over an explicit override, as Detectron2's demo


# (config, predicts masks); the caps: R-CNN heads and RetinaNet read TEST.DETECTIONS_PER_IMAGE,
# afigan's FCOS (also CenterMask's detector) MODEL.FCOS.POST_NMS_TOPK_TEST.
KINDS = {
    "mask_rcnn": ("mask_rcnn_R_50_FPN_toy_afi.yaml", True),
    "mask_rcnn_pafpn": ("mask_rcnn_R_50_PAFPN_toy_afi.yaml", True),
    "cascade_mask_rcnn": ("cascade_mask_rcnn_S_101_PAFPN_toy_afi.yaml", True),
    "cascade_rcnn_swin": ("cascade_rcnn_Swin_T_BiFPN_toy_afi.yaml", False),
    "fcos": ("fcos_R_50_FPN_toy_afi.yaml", False),
    "fcos_bifpn": ("fcos_R_50_BiFPN_toy_afi.yaml", False),
    "centermask": ("centermask_R_50_BiFPN_toy_afi.yaml", True),
    "retinanet": ("retinanet_R_50_FPN_toy_afi.yaml", False),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_detector_kind_draws_and_writes(kind, tmp_path, dataset):
    config, masks = KINDS[kind]
    image = sorted(dataset["ids"])[1]
    n = 3
    # Threshold 0: a random-weight FCOS / RetinaNet scores ~0.01-0.1, and this test wants detections.
    result = _demo(
        f"configs/toy/detectors/{config}",
        [image],
        tmp_path,
        0.0,
        dataset,
        "TEST.DETECTIONS_PER_IMAGE",
        n,
        "MODEL.FCOS.POST_NMS_TOPK_TEST",
        n,
    )
    assert result["images"] == [str(tmp_path / os.path.basename(image))]
    assert os.path.getsize(result["images"][0]) > 1000
    preds = _load(tmp_path)
    assert 0 < len(preds) <= n
    assert {p["image_id"] for p in preds} == {dataset["ids"][image]}
    assert {p["category_id"] for p in preds} <= set(CATEGORY_IDS.values())
    assert all(("segmentation" in p) == masks for p in preds)


def test_no_matching_input_exits_with_one_sentence(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "demo.py"),
            "--config-file",
            os.path.join(ROOT, MASK_RCNN),
            "--input",
            str(tmp_path / "*.jpg"),
            str(tmp_path / "none"),
            "--output",
            str(tmp_path / "out"),
            "MODEL.DEVICE",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    expected = f"demo: no image file matches --input {tmp_path / '*.jpg'} {tmp_path / 'none'}."
    assert lines == [expected], out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


def test_help_and_trailing_overrides(tmp_path, monkeypatch):
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "tools", "demo.py")).read()))
    text = " ".join(demo_parser(doc).format_help().split())
    assert " ".join(doc.splitlines()[0].split()) in text
    for flag in ("--config-file", "--input", "--output", "--confidence-threshold", "--opts"):
        assert flag in text, flag
    # --input's values end where a config key starts; --opts (Detectron2's demo) adds to them.
    assert split_overrides(["a.png", "dir/", "MODEL.WEIGHTS", "m.pth", "MODEL.DEVICE", "cpu"], ["SEED", "1"]) == (
        ["a.png", "dir/"],
        ["MODEL.WEIGHTS", "m.pth", "MODEL.DEVICE", "cpu", "SEED", "1"],
    )
    assert split_overrides(["MODEL.pth", "x.jpg"], []) == (["MODEL.pth", "x.jpg"], [])  # a file, not a key
    monkeypatch.chdir(tmp_path)
    open("DSC_01.JPG", "w").close()  # looks like a config key, but it is a file
    assert split_overrides(["DSC_01.JPG", "SEED", "1"], []) == (["DSC_01.JPG"], ["SEED", "1"])
    args = demo_parser().parse_args(
        ["--config-file", "c.yaml", "--input", "a.png", "--output", "o", "--opts", "MODEL.DEVICE", "cpu"]
    )
    assert args.input == ["a.png"] and args.more_opts == ["MODEL.DEVICE", "cpu"] and args.confidence_threshold == 0.5
