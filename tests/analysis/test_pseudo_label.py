"""Self-training: the toy set's unlabeled split, tools/pseudo_label.py's COCO file, training on
labeled + pseudo-labeled images with per-source repeat factors, and the pipeline's
stage3_pseudo.yaml step (afigan/analysis/pseudo_label.py, afigan/data/{toy_shapes,datasets,loader}.py,
afigan/engine/pipeline.py). A random-weight toy Mask R-CNN at ~100 px plays the trained model."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from d2_helpers import CONFIGS, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from afigan.analysis.pseudo_label import assign_image_ids, pseudo_label_main  # noqa: E402
from afigan.data.datasets import register_toy_dataset  # noqa: E402
from afigan.data.loader import build_index_sampler, load_train_dataset  # noqa: E402
from afigan.data.toy_shapes import (
    TOY_CATEGORIES,
    UNLABELED_FIRST_ID,
    ensure_toy_unlabeled,  # noqa: E402
    make_toy_dataset,
    toy_paths,
    toy_unlabeled_paths,
)

CONFIG = "toy/pipeline/stage3.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy set (4 train, 2 val, 5 unlabeled images) registered as pl_toy_*, and a saved
    random toy Mask R-CNN whose box classifier is spread so that scores reach above 0.5."""
    tmp = tmp_path_factory.mktemp("pseudo")
    root = make_toy_dataset(str(tmp / "afigan_toy"), num_train=4, num_val=2, seed=5, num_unlabeled=5)
    register_toy_dataset(root, prefix="pl_toy")
    torch.manual_seed(0)
    model = build_model(make_cfg(CONFIG))
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=3e-4)  # scores ~0.4-0.6
    weights = str(tmp / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return {"root": root, "weights": weights, "tmp": tmp}


def _label(toy, out, threshold, images=None, *opts):
    return pseudo_label_main(
        [
            "--config-file",
            os.path.join(CONFIGS, CONFIG),
            "--images",
            images or toy_unlabeled_paths(toy["root"])[1],
            "--output",
            out,
            "--score-threshold",
            str(threshold),
            "MODEL.WEIGHTS",
            toy["weights"],
            "DATASETS.TRAIN",
            "('pl_toy_train',)",
            *map(str, SMALL),
            *opts,
        ]
    )


@pytest.fixture(scope="module")
def labels(toy):
    """Pseudo-labels at threshold 0 (every detection) and at the median score of those."""
    everything = str(toy["tmp"] / "all.json")
    _label(toy, everything, 0.0)
    scores = [a["score"] for a in json.load(open(everything))["annotations"]]
    threshold = float(np.median(scores))
    thresholded = str(toy["tmp"] / "pseudo.json")
    _label(toy, thresholded, threshold)
    return {"all": everything, "file": thresholded, "threshold": threshold}


def test_unlabeled_split_has_images_and_no_annotations(toy, tmp_path):
    info, folder = toy_unlabeled_paths(toy["root"])
    coco = COCO(info)
    ids = sorted(coco.getImgIds())
    assert ids == list(range(UNLABELED_FIRST_ID, UNLABELED_FIRST_ID + 5))
    assert not coco.anns and "annotations" not in json.load(open(info))  # as COCO's image_info files
    assert sorted(os.listdir(folder)) == sorted(im["file_name"] for im in coco.loadImgs(ids))
    # The labeled splits are the same with or without it, and a set made before it gains it in place.
    a = make_toy_dataset(str(tmp_path / "a"), 3, 2, seed=5, num_unlabeled=0)
    b = make_toy_dataset(str(tmp_path / "b"), 3, 2, seed=5, num_unlabeled=2)
    assert json.load(open(toy_paths(a, "train")[0])) == json.load(open(toy_paths(b, "train")[0]))
    os.remove(toy_unlabeled_paths(a)[0])
    os.rmdir(toy_unlabeled_paths(a)[1])
    ensure_toy_unlabeled(a, num_images=2, seed=5)
    assert json.load(open(toy_unlabeled_paths(a)[0]))["images"] == json.load(open(toy_unlabeled_paths(b)[0]))["images"]


def test_pseudo_labels_are_a_valid_coco_file_of_the_unlabeled_split(toy, labels):
    coco = COCO(labels["file"])
    unlabeled = COCO(toy_unlabeled_paths(toy["root"])[0])
    # Every unlabeled image is listed (with or without detections), under the split's own ids and names.
    assert sorted(coco.getImgIds()) == sorted(unlabeled.getImgIds())
    for image_id in coco.getImgIds():
        assert coco.imgs[image_id]["file_name"] == unlabeled.imgs[image_id]["file_name"]
    assert coco.loadCats(coco.getCatIds()) == TOY_CATEGORIES
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(a["score"] >= labels["threshold"] for a in anns)
    assert {a["category_id"] for a in anns} <= {c["id"] for c in TOY_CATEGORIES}
    for a in anns:
        img = coco.imgs[a["image_id"]]
        assert a["iscrowd"] == 0
        mask = mask_utils.decode(a["segmentation"])
        assert mask.shape == (img["height"], img["width"])
        assert a["area"] == float(mask.sum()) > 0
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-3 and y + h <= img["height"] + 1e-3
    # Exactly the detections >= the threshold of the unthresholded run.
    everything = json.load(open(labels["all"]))["annotations"]
    assert len(anns) == sum(a["score"] >= labels["threshold"] for a in everything) < len(everything)
    info = json.load(open(labels["file"]))["info"]["afigan_pseudo_labels"]
    assert info["like"] == "pl_toy_train" and info["image_root"] == toy_unlabeled_paths(toy["root"])[1]


def test_images_by_data_set_name_and_image_ids_without_image_info(toy, tmp_path):
    out = str(tmp_path / "by_name.json")
    _label(toy, out, 0.9, "pl_toy_unlabeled")
    assert sorted(im["id"] for im in json.load(open(out))["images"]) == list(
        range(UNLABELED_FIRST_ID, UNLABELED_FIRST_ID + 5)
    )
    assert assign_image_ids(["d/000000000139.jpg", "d/000000000285.jpg"]) == {
        "d/000000000139.jpg": 139,
        "d/000000000285.jpg": 285,
    }
    assert assign_image_ids(["d/cat.jpg", "d/dog.jpg"]) == {"d/cat.jpg": 1, "d/dog.jpg": 2}


def _train_cfg(labels, *factors, mask_format="bitmask"):
    return make_cfg(
        CONFIG,
        *SMALL,
        "DATASETS.TRAIN",
        ("pl_toy_train", "pseudo:" + labels["file"]),
        "DATALOADER.SOURCE_REPEAT_FACTORS",
        list(factors),
        "INPUT.MASK_FORMAT",
        mask_format,
    )


@pytest.mark.parametrize("factors", [(1.0, 0.5), (1.0, 2.5)])
def test_source_repeat_factors_set_how_often_each_source_is_drawn(toy, labels, factors):
    cfg = _train_cfg(labels, *factors)
    dataset = load_train_dataset(cfg)
    sources = np.array([d["train_source"] for d in dataset])
    assert set(sources) == {0, 1}
    sampler = iter(build_index_sampler(cfg, dataset, seed=0))
    counts = np.bincount([next(sampler) for _ in range(40000)], minlength=len(dataset))
    per_image = [counts[sources == s].mean() for s in (0, 1)]
    assert per_image[1] / per_image[0] == pytest.approx(factors[1] / factors[0], rel=0.05)


def test_bad_source_inputs_are_one_sentence(toy, labels):
    with pytest.raises(
        ValueError, match=r"SOURCE_REPEAT_FACTORS \(1\.0,\) needs one positive factor per DATASETS\.TRAIN"
    ):
        load_train_dataset(_train_cfg(labels, 1.0))
    with pytest.raises(ValueError, match="set INPUT.MASK_FORMAT bitmask"):
        load_train_dataset(_train_cfg(labels, 1.0, 1.0, mask_format="polygon"))
    with pytest.raises(FileNotFoundError, match="write it with tools/pseudo_label.py"):
        load_train_dataset(make_cfg(CONFIG, "DATASETS.TRAIN", ("pl_toy_train", "pseudo:missing.json")))


def test_training_on_labeled_and_pseudo_labeled_images_runs_a_step(toy, labels, tmp_path):
    from stage_helpers import stage_cfg

    from afigan.engine.detector import DetectorTrainer

    cfg = stage_cfg(
        CONFIG,
        str(tmp_path),
        "DATASETS.TRAIN",
        ("pl_toy_train", "pseudo:" + labels["file"]),
        "DATALOADER.SOURCE_REPEAT_FACTORS",
        [1.0, 4.0],
        "INPUT.MASK_FORMAT",
        "bitmask",
        "DATASETS.TEST",
        (),
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.IMS_PER_BATCH",
        4,
    )
    trainer = DetectorTrainer(cfg)
    batch = next(iter(trainer.build_train_loader(cfg, 0, trainer.train_dataset)))
    assert any(d["train_source"] == 1 for d in batch)  # pseudo-labeled images (4x as likely) are in it
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 2 and os.path.isfile(os.path.join(str(tmp_path), "model_final.pth"))
    lines = [json.loads(x) for x in open(os.path.join(str(tmp_path), "metrics.json"))]
    assert np.isfinite(lines[-1]["total_loss"]) and lines[-1]["loss_mask"] > 0


def test_pipeline_pseudo_labels_between_two_stage3_trainings(toy, tool, tmp_path):
    """configs/toy/pipeline_self_training: stages 0-3 done (their files in place), so the run
    pseudo-labels with the stage-3 model, trains stage3_pseudo on labeled + pseudo and evaluates it."""
    out = tmp_path / "out"
    for stage, files in (
        ("stage0", ["model_final.pth"]),
        ("stage1", ["G_0/model_final.pth", "D_0/model_final.pth"]),
        ("stage2", ["AFExtractor/model_final.pth", "Disc/model_final.pth"]),
        ("stage3", ["model_final.pth"]),
    ):
        for f in files:
            os.makedirs(os.path.dirname(out / stage / f), exist_ok=True)
            # The saved toy Mask R-CNN: stage 3's model, and stage 2's file for its srf_module tensors.
            os.symlink(toy["weights"], out / stage / f)
    code, err, output = tool(
        "pipeline",
        "--config-dir",
        os.path.join(CONFIGS, "toy", "pipeline_self_training"),
        "--output-dir",
        out,
        "DATASETS.TRAIN",
        "('pl_toy_train',)",
        "DATASETS.TEST",
        "('pl_toy_val',)",
        "SELF_TRAINING.IMAGES",
        "('pl_toy_unlabeled',)",
        "SELF_TRAINING.SCORE_THRESHOLD",
        0.3,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.IMS_PER_BATCH",
        2,
        "INPUT.MIN_SIZE_TRAIN",
        "(96,)",
        "INPUT.MAX_SIZE_TRAIN",
        160,
        *SMALL,
    )
    assert code == 0, err
    assert "[pipeline] stage3: skipped, already done" in output
    assert "[pipeline] pseudo-labels: running: the stage-3 model" in output
    assert (
        "[pipeline] stage3_pseudo: running in float32: the target detector again, on labeled + pseudo-labeled images"
        in output
    )
    # The tool's summary names the self-trained model; the skipped teacher has no AP to print.
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("stage-")] == [
        "stage-3 (self-trained) bbox",
        "stage-3 (self-trained) segm",
    ]
    pseudo = out / "pseudo_labels" / "pseudo_labels.json"
    assert COCO(str(pseudo)).getAnnIds()
    cfg = json.load(open(out / "results.json"))
    assert sorted(cfg) == ["bbox", "segm"]
    assert (out / "stage3_pseudo" / "model_final.pth").is_file()
    saved = make_cfg(None)
    saved.merge_from_file(str(out / "stage3_pseudo" / "config.yaml"))
    assert tuple(saved.DATASETS.TRAIN) == ("pl_toy_train", "pseudo:" + str(pseudo))
    assert saved.MODEL.AF_EXTRACTOR_WEIGHTS == str(out / "stage2" / "AFExtractor" / "model_final.pth")
