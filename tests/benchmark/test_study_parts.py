"""The study's parts "curves" and "probe" (tools/study.py --part ...) end to end on a tiny budget:
every curve arm trained through the pipeline and evaluated at each checkpoint, the second seed
going to the best other kind, a killed arm resumed, the probe's arms on the same images with their
bootstrap intervals, and both parts' sections kept in study.json whichever part runs."""

import json
import os

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("matplotlib")


from afigan.config import load_config  # noqa: E402

# A 2-iteration teacher; curves of AFI (also at ADV_WEIGHT 0) and FADE over 4 iterations, G
# evaluated every 2, second seeds on; the probe on 3 images with 50 resamples; 128-px images.
TINY = [
    "--max-iter", 2, 2, 2, 2,
    "--curve-iters", 4, "--curve-period", 2, "--curve-kinds", "afi", "fade", "--adv-weights", "0",
    "--second-seed", "on", "--fidelity-images", 2, "--dataset-test", "afigan_toy_val",
    "--probe-images", 3, "--resamples", 50,
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 160, "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 160, "TEST.DETECTIONS_PER_IMAGE", 10,
]  # fmt: skip
ARMS = ["afi", "fade", "afi_adv0", "afi_seed1", "fade_seed1"]


def test_curves_then_probe_on_a_tiny_budget_resume_and_keep_each_others_sections(tmp_path, capsys, study):
    out = tmp_path / "study"
    paths = study("--part", "curves", "--output-dir", out, *TINY)
    assert set(paths) == {"json", "md", "curves_png"}
    written = json.load(open(paths["json"]))
    c = written["curves"]
    assert list(c["arms"]) == ARMS  # first seeds, then AFI and the best other kind (the only one: fade)
    assert c["second_seed_kind"] == "fade"
    assert set(c["reference"]) == {"nearest", "bilinear"}
    assert set(c["reference"]["bilinear"]) == {"p2", "p3", "p4", "p5", "p6"}
    for name, arm in c["arms"].items():
        assert [p["iteration"] for p in arm["points"]] == [2, 4]
        levels = set(arm["points"][-1]["scores"])
        assert levels == ({"p3", "p4", "p5", "p6"} if arm["kind"] == "fade" else {"p2", "p3", "p4", "p5", "p6"})
        scores = arm["points"][-1]["scores"]["p3"]
        assert {"l1", "rel_l2", "psnr", "hf_l1", "hf_ratio"} <= set(scores)
        assert set(arm["convergence"]) == {"from", "to", "improvement", "converged"}
        assert arm["convergence"]["from"] == 2 and arm["convergence"]["to"] == 4
        assert os.path.isfile(arm["weights"])
    run = out / "curves" / "4it"
    assert os.path.isfile(run / "afi" / "stage1" / "G_0" / "model_0000001.pth")  # every checkpoint kept
    cfg = {a: load_config(str(run / a / "stage1" / "config.yaml")) for a in ARMS}
    assert cfg["afi_adv0"].MODEL.AFI.ADV_WEIGHT == 0.0 and cfg["afi"].MODEL.AFI.ADV_WEIGHT == 1e-3
    assert cfg["afi_seed1"].SEED == 1 and cfg["afi"].SEED == 0
    assert cfg["fade"].MODEL.AFI.INTERP == "fade" and cfg["afi"].SOLVER.AMP.ENABLED
    assert cfg["afi"].MODEL.GUIDE_WEIGHTS == str(out / "teacher" / "stage0" / "model_final.pth")
    names = {r["name"] for r in written["runs"]}
    assert names == {"teacher"} | {f"curves/4it/{a}" for a in ARMS}
    assert "## Fidelity curves" in open(paths["md"]).read()

    # The probe reads the curves from study.json: every converged G, with the fixed arms around them.
    capsys.readouterr()
    paths = study("--part", "probe", "--output-dir", out, *TINY)
    written = json.load(open(paths["json"]))
    p = written["probe"]
    assert p["arms"] == ["full", "nearest", "bilinear"] + ARMS + ["half"]
    assert p["images"] == 3 and p["resamples"] == 50 and p["ran"] == p["arms"]
    assert p["fallback"] == {"fade": ["p2"], "fade_seed1": ["p2"]}
    for task in ("bbox", "segm"):
        bil = p["scores"][task]["bilinear"]
        assert bil["diff"] == 0.0 and bil["ci"] == [0.0, 0.0]
        for arm in p["arms"]:
            e = p["scores"][task][arm]
            assert e["ci"][0] <= e["ci"][1] and isinstance(e["resolved"], bool)
    assert written["curves"] == json.load(open(out / "study.json"))["curves"]  # kept from the first call
    assert [a for a in ARMS if os.path.isfile(out / "probe" / "3img" / f"{a}.json")] == ARMS
    md = open(paths["md"]).read()
    assert "## Fidelity curves" in md and "## Detection probe" in md and "| half |" in md

    # A killed curve arm (its final checkpoints gone, the last one at iteration 2) resumes, and
    # only its new checkpoint is evaluated; the probe reruns only an arm whose detections are missing.
    afi = run / "afi" / "stage1"
    for d in ("G_0", "D_0"):
        os.remove(afi / d / "model_final.pth")
        (afi / d / "last_checkpoint").write_text("model_0000001.pth")
    cached = json.load(open(afi / "curve.json"))["points"]["model_0000001.pth"]
    capsys.readouterr()
    study("--output-dir", out, "--part", "curves", *TINY)
    log = capsys.readouterr().out
    assert "resuming at iteration 2" in log
    assert json.load(open(afi / "curve.json"))["points"]["model_0000001.pth"] == cached
    status = {r["name"]: r["status"] for r in json.load(open(out / "study.json"))["runs"]}
    assert status["curves/4it/afi"] == "ran" and status["curves/4it/fade"] == "skipped, already done"
    os.remove(out / "probe" / "3img" / "fade.json")
    study("--output-dir", out, "--part", "probe", *TINY)
    ran = json.load(open(out / "study.json"))["probe"]["ran"]
    assert "fade" in ran and not {"full", "bilinear", "afi_adv0", "fade_seed1"} & set(ran)
