"""The study of tools/study.py (afigan/benchmark/study/): its fidelity measures against values
computed by hand, its statistics over seeds, its schedule compression, and its detection part on a
2-iteration budget (all outputs written, every run recorded, a second call skipping them all).
The curves and probe parts: test_study_parts.py."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("matplotlib")

from conftest import one_sentence_error  # noqa: E402
from d2_helpers import CONFIGS  # noqa: E402

from afigan.benchmark.study import (  # noqa: E402
    budget_overrides,
    fixed_x2,
    interpolation_fidelity,
    mean_std,
    paired,
    seed_noise,
    subset_ap,
    summarize,
)

# A tiny pyramid: p2's half-resolution map is 2x2, its target 4x4; p3's target is 2x3, one
# column narrower than x2 of its 1x2 half-resolution map (an odd pyramid), so it is compared on
# the common 2x3 window.
LOW = {"p2": torch.tensor([[0.0, 4.0], [8.0, 12.0]])[None, None], "p3": torch.tensor([[1.0, 3.0]])[None, None]}
REAL = {"p2": torch.arange(16.0).view(1, 1, 4, 4), "p3": torch.tensor([[1.0, 1.0, 3.0], [1.0, 2.0, 3.0]])[None, None]}


def test_nearest_and_bilinear_errors_equal_hand_computed_values():
    scores = interpolation_fidelity(
        [(REAL, LOW)],
        {"nearest": fixed_x2("nearest", ["p2", "p3"]), "bilinear": fixed_x2("bilinear", ["p2", "p3"])},
        ["p2", "p3"],
    )
    # p2 nearest: [[0,0,4,4],[0,0,4,4],[8,8,12,12],[8,8,12,12]] - arange(16): |d| sums to 36, d^2 to 120;
    # sum of target^2 = 0^2 + ... + 15^2 = 1240; target range 15.
    nn = scores["nearest"]["p2"]
    assert nn["values"] == 16
    assert nn["l1"] == pytest.approx(36 / 16)
    assert nn["rel_l2"] == pytest.approx(math.sqrt(120 / 1240))
    assert nn["psnr"] == pytest.approx(10 * math.log10(15**2 / (120 / 16)))
    # p2 bilinear (half-pixel centres, edges clamped): rows [0,1,3,4], [2,3,5,6], [6,7,9,10], [8,9,11,12];
    # d = [[0,0,1,1], [-2,-2,-1,-1], [-2,-2,-1,-1], [-4,-4,-3,-3]]: |d| sums to 28, d^2 to 72.
    bl = scores["bilinear"]["p2"]
    assert bl["l1"] == pytest.approx(28 / 16)
    assert bl["rel_l2"] == pytest.approx(math.sqrt(72 / 1240))
    assert bl["psnr"] == pytest.approx(10 * math.log10(15**2 / (72 / 16)))
    # p3 nearest: [[1,1,3,3],[1,1,3,3]] cut to 2x3 -> one error of 1 in 6 values; range 2; sum target^2 = 25.
    p3 = scores["nearest"]["p3"]
    assert p3["values"] == 6
    assert p3["l1"] == pytest.approx(1 / 6)
    assert p3["rel_l2"] == pytest.approx(math.sqrt(1 / 25))
    assert p3["psnr"] == pytest.approx(10 * math.log10(2**2 / (1 / 6)))


def test_errors_are_pooled_over_images_and_the_range_spans_all_of_them():
    # A second image whose p2 target is the first's + 100: its nearest errors are the first's + 100 - 0.
    low2 = {"p2": LOW["p2"] + 100.0}
    real2 = {"p2": REAL["p2"] + 100.0}
    both = interpolation_fidelity([(REAL, LOW), (real2, low2)], {"nearest": fixed_x2("nearest", ["p2"])}, ["p2"])[
        "nearest"
    ]["p2"]
    assert both["values"] == 32
    assert both["l1"] == pytest.approx(36 / 16)  # the same errors twice
    assert both["psnr"] == pytest.approx(10 * math.log10(115**2 / (120 / 16)))  # range 0..115
    assert both["rel_l2"] == pytest.approx(math.sqrt(240 / (1240 + float(((torch.arange(16.0) + 100) ** 2).sum()))))


def test_a_perfect_interpolator_scores_zero_error_and_infinite_psnr():
    perfect = lambda low: {l: REAL[l].clone() for l in ("p2", "p3")}  # noqa: E731 - it returns the target
    scores = interpolation_fidelity(
        [(REAL, LOW)], {"perfect": perfect, "nearest": fixed_x2("nearest", ["p2", "p3"])}, ["p2", "p3"]
    )
    for level in ("p2", "p3"):
        assert scores["perfect"][level]["l1"] == 0.0
        assert scores["perfect"][level]["rel_l2"] == 0.0
        assert scores["perfect"][level]["psnr"] == math.inf
        assert scores["nearest"][level]["l1"] > 0  # the same pass scores a real interpolator normally


def test_a_level_an_interpolator_does_not_predict_is_left_out():
    only_p3 = lambda low: {"p3": torch.nn.functional.interpolate(low["p3"], scale_factor=2.0)}  # noqa: E731
    scores = interpolation_fidelity([(REAL, LOW)], {"guided-like": only_p3}, ["p2", "p3"])
    assert set(scores["guided-like"]) == {"p3"}


def test_mean_and_sample_std_over_seeds():
    ms = mean_std([1.0, 2.0, 3.0, 4.0])
    assert ms["mean"] == pytest.approx(2.5) and ms["n"] == 4
    assert ms["std"] == pytest.approx(math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3))  # n - 1 in the denominator
    assert mean_std([7.0]) == {"mean": 7.0, "std": None, "n": 1}
    assert mean_std([])["mean"] is None


def test_paired_differences_use_only_common_seeds():
    p = paired({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 6.0, 2: 4.0, 3: 9.0})
    assert p["diffs"] == {0: 2.0, 1: -1.0, 2: 0.0}
    assert p["wins"] == 1 and p["n"] == 3
    assert p["mean"] == pytest.approx(1 / 3)
    assert p["std"] == pytest.approx(math.sqrt(((5 / 3) ** 2 + (4 / 3) ** 2 + (1 / 3) ** 2) / 2))


def test_summary_counts_a_model_without_detections_as_ap_zero():
    detection = {
        "nearest": {
            0: {"bbox": {"AP": 10.0, "APs": 2.0}, "segm": {"AP": 8.0, "APs": 1.0}},
            1: {"bbox": {"AP": 12.0, "APs": 4.0}, "segm": {"AP": 9.0, "APs": 3.0}},
        },
        "afi": {
            0: {"bbox": {"AP": "nan", "APs": "nan"}, "segm": {"AP": 11.0, "APs": 5.0}},
            1: {"bbox": {"AP": 13.0, "APs": 6.0}, "segm": {"AP": 10.0, "APs": 2.0}},
        },
    }
    s = summarize(detection)
    assert s["afi"]["bbox"]["per_seed"] == {0: 0.0, 1: 13.0}
    assert s["afi"]["bbox"]["APs"]["n"] == 1  # a NaN APs (no small object, or no detection) is left out
    assert s["afi"]["bbox"]["vs_nearest"]["diffs"] == {0: -10.0, 1: 1.0}
    assert s["afi"]["segm"]["vs_nearest"]["wins"] == 2
    assert s["nearest"]["segm"]["AP"]["mean"] == pytest.approx(8.5)
    # Pooled seed noise: root of the mean of the arms' variances (bbox: 2 and 84.5; segm: 0.5 and 0.5).
    noise = seed_noise(s)
    assert noise["bbox"] == pytest.approx(math.sqrt((2.0 + 84.5) / 2))
    assert noise["segm"] == pytest.approx(math.sqrt(0.5))


def test_subset_ap_scores_each_part_of_the_images_alone(tmp_path):
    # Two images with one square each; the model finds image 1's exactly and misses image 2's.
    gt = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in (1, 2)],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": [10, 10, 40, 40],
                "area": 1600,
                "iscrowd": 0,
                "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
            }
            for i in (1, 2)
        ],
        "categories": [{"id": 1, "name": "square"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.9},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    parts = subset_ap(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"), parts=2)
    assert parts == [pytest.approx(100.0), pytest.approx(0.0)]
    whole = subset_ap(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"), parts=1)[0]
    assert 0 < whole < 100
    assert subset_ap(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"), parts=2, iou_type="segm") == [
        0.0,
        0.0,
    ]  # no masks


def test_budget_compresses_the_yaml_schedule():
    stage3 = os.path.join(CONFIGS, "toy", "pipeline", "stage3.yaml")  # 300 iterations, step 240, warm-up 50
    assert budget_overrides(stage3, 240, []) == [
        "SOLVER.MAX_ITER",
        "240",
        "SOLVER.STEPS",
        "(192,)",
        "SOLVER.WARMUP_ITERS",
        "40",
    ]
    assert budget_overrides(stage3, 2, [])[:4] == [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.STEPS",
        "()",
    ]  # no step at the last iteration
    assert budget_overrides(stage3, 0, []) == []


# The smallest study: two iterations per stage, one seed, a fixed and a learned arm, 128-px images
# (stage 2 halves the teacher's P6, which needs 2 px, so 128 px is the least for a 5-level pyramid).
TINY = [
    "--quick",
    "--part",
    "detection",
    "--max-iter",
    2,
    2,
    2,
    2,
    "--kinds",
    "nearest",
    "afi",
    "--seeds",
    0,
    "--ablations",
    "--fidelity-images",
    2,
    "--dataset-test",
    "afigan_toy_val",
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    160,
    "INPUT.MIN_SIZE_TEST",
    128,
    "INPUT.MAX_SIZE_TEST",
    160,
    "TEST.DETECTIONS_PER_IMAGE",
    10,
]


def test_quick_study_on_two_iterations_writes_every_output_and_skips_finished_runs(tmp_path, capsys, study):
    out = tmp_path / "study"
    paths = study("--output-dir", out, *TINY)
    assert set(paths) == {"json", "md", "fidelity_png", "detection_png"}
    for p in paths.values():
        assert os.path.getsize(p) > 0
    written = json.load(open(paths["json"]))
    runs = {r["name"]: r for r in written["runs"]}
    assert set(runs) == {"teacher", "afi/stage1", "afi/stage2", "nearest/stage3_seed0", "afi/stage3_seed0"}
    assert all(r["status"] == "ran" and r["seed"] == 0 and os.path.isfile(r["config_yaml"]) for r in runs.values())
    # Stage 3 of the progressive arm starts from the chain's stage 2; the baseline only swaps the upsampler.
    afi3 = runs["afi/stage3_seed0"]["opts"]
    assert afi3[afi3.index("MODEL.AF_EXTRACTOR_WEIGHTS") + 1] == str(
        out / "afi" / "stage2" / "AFExtractor" / "model_final.pth"
    )
    near3 = runs["nearest/stage3_seed0"]["opts"]
    assert "MODEL.AF_EXTRACTOR_WEIGHTS" not in near3 and near3[near3.index("MODEL.AFI.INTERP") + 1] == "nearest"
    fid = written["fidelity"]["scores"]
    assert set(fid) == {"nearest", "bilinear", "afi G (stage 1)", "afi (stage 2)"}
    assert set(fid["nearest"]) == {"p2", "p3", "p4", "p5", "p6"}
    assert fid["bilinear"]["p2"]["l1"] != fid["nearest"]["p2"]["l1"]
    assert set(written["summary"]) == {"nearest", "afi"} and written["summary"]["afi"]["bbox"]["AP"]["n"] == 1
    md = open(paths["md"]).read()
    assert "## Interpolation fidelity" in md and "## Detection" in md and "| afi/stage3_seed0 | ran |" in md

    capsys.readouterr()
    study("--output-dir", out, *TINY)  # again: nothing is trained
    again = {r["name"]: r for r in json.load(open(paths["json"]))["runs"]}
    assert all(r["status"] == "skipped, already done" for r in again.values())
    assert again["teacher"]["wall_s"] == runs["teacher"]["wall_s"]  # the time it took when it ran
    assert "running" not in capsys.readouterr().out

    # --report-only with a seed not yet run: tables of the finished runs, nothing trained.
    seeds = TINY.index("--seeds")
    study("--report-only", "--output-dir", out, *TINY[: seeds + 1], 0, 1, *TINY[seeds + 2 :])
    reported = json.load(open(paths["json"]))
    status = {r["name"]: r["status"] for r in reported["runs"]}
    assert status["afi/stage3_seed1"] == status["nearest/stage3_seed1"] == "not run (--report-only)"
    assert status["afi/stage3_seed0"] == "skipped, already done"
    assert reported["summary"]["afi"]["bbox"]["per_seed"].keys() == {"0"}  # seed 1 is left out, not zero
    assert not os.path.exists(out / "afi" / "stage3_seed1")

    # Other settings on the same folder would mix two studies: the pipeline's stale-settings rule
    # stops at the first run started with other settings, in one sentence; nothing is run.
    changed = list(TINY)
    changed[changed.index("--max-iter") + 1] = 3
    with pytest.raises(SystemExit) as e:
        study("--output-dir", out, *changed)
    assert e.value.code == 1
    err = capsys.readouterr()
    assert one_sentence_error(err.err) == (
        f"stage0 in {str(out / 'teacher' / 'stage0')!r} was started with other settings than this run's: "
        "SOLVER.MAX_ITER 2 -> 3, SOLVER.STEPS () -> (2,); give a new --output-dir, or delete that folder (and "
        "the study's runs that start from it) to train it again."
    )
    assert "running" not in err.out


def test_a_missing_config_set_is_one_sentence(tmp_path, capsys, study):
    with pytest.raises(SystemExit) as e:
        study("--output-dir", tmp_path, "--quick", "--kinds", "dysample", "--config-dir", tmp_path / "nowhere")
    assert e.value.code == 1
    assert "needs the config set" in one_sentence_error(capsys.readouterr().err)
