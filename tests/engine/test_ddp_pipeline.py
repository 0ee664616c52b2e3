import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import CONFIGS, REPO  # noqa: E402
from ddp_worker import stage1_two_ranks  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from stage_helpers import TINY, save_teacher  # noqa: E402

from afigan.engine.pipeline import Pipeline, stage_final_files  # noqa: E402

D_BATCHNORMS = 3  # BatchNorm layers of the toy D (MODEL.AFI.DIS.NORM "BN")


def test_stage1_ddp_two_cpu_processes_keep_g_and_d_identical(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher.pth"))
    result = str(tmp_path / "ddp.json")
    launch(stage1_two_ranks, 2, dist_url="auto", args=(str(tmp_path / "out"), teacher, result))
    with open(result) as f:
        res = json.load(f)
    assert res["world_size"] == 2
    assert res["max_abs_diff"] == {"G": 0.0, "D": 0.0}
    # D's BatchNorm buffers are not broadcast (the reference's and Detectron2's choice): each rank's
    # statistics saw its own share of the batch, and the checkpoint holds rank 0's.
    ranks = [torch.load(str(tmp_path / f"D_buffers_rank{r}.pt")) for r in (0, 1)]
    saved = torch.load(str(tmp_path / "out" / "D_0" / "model_final.pth"), weights_only=False)["model"]
    names = sorted(ranks[0])
    assert names == sorted(ranks[1]) and len(names) == 3 * D_BATCHNORMS  # running mean, var, batches tracked
    assert all(torch.equal(saved[k], ranks[0][k]) for k in names), [
        k for k in names if not torch.equal(saved[k], ranks[0][k])
    ]
    assert any(not torch.equal(ranks[0][k], ranks[1][k]) for k in names if "running_" in k)


def _pipeline_args(output_dir):
    import argparse

    return argparse.Namespace(
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        opts=[],
        config_file="",
        resume=True,
        eval_only=False,
    )


def test_toy_pipeline_end_to_end_then_skips_finished_stages(tmp_path, caplog):
    import logging

    status = logging.getLogger("afigan_pipeline")
    status.addHandler(caplog.handler)
    opts = [str(o) if not isinstance(o, tuple) else o for o in TINY] + [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "1000",
    ]
    out = str(tmp_path / "pipe")
    try:
        _run_pipeline_twice(out, opts, caplog)
    finally:
        status.removeHandler(caplog.handler)


def _run_pipeline_twice(out, opts, caplog):
    results = Pipeline(os.path.join(CONFIGS, "toy", "pipeline"), out, _pipeline_args(out), opts).run()
    lines = [r.getMessage() for r in caplog.records if r.name == "afigan_pipeline"]
    assert [l.split(":")[0] for l in lines] == ["stage0", "stage1", "stage2", "stage3", "results", "metrics"]
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 0  # afigan/analysis/metrics.py
    assert len(lines) >= 4 and all(": running in float32: " in l for l in lines[:4]), lines
    caplog.clear()
    for files in stage_final_files(out).values():
        assert all(os.path.isfile(f) for f in files), files
    assert "bbox" in results and "AP" in results["bbox"]
    with open(os.path.join(out, "results.json")) as f:
        assert set(json.load(f)) == set(results)
    # The chain is wired: the stage-3 config got the stage-2 file, stage 2 the stage-1 files.
    cfg3 = open(os.path.join(out, "stage3", "config.yaml")).read()
    assert os.path.join(out, "stage2", "AFExtractor", "model_final.pth") in cfg3
    cfg2 = open(os.path.join(out, "stage2", "config.yaml")).read()
    assert os.path.join(out, "stage1", "G_0", "model_final.pth") in cfg2
    assert os.path.join(out, "stage0", "model_final.pth") in cfg2
    # Second run: every stage is skipped (files untouched) and only the evaluation runs again.
    stamps = {f: os.path.getmtime(f) for files in stage_final_files(out).values() for f in files}
    again = Pipeline(os.path.join(CONFIGS, "toy", "pipeline"), out, _pipeline_args(out), opts).run()
    assert {f: os.path.getmtime(f) for f in stamps} == stamps
    assert again["bbox"].keys() == results["bbox"].keys()
    lines = [r.getMessage() for r in caplog.records if r.name == "afigan_pipeline"]
    assert [l.split(":")[0] for l in lines] == [
        "stage0",
        "stage1",
        "stage2",
        "stage3",
        "evaluation",
        "results",
        "metrics",
    ]
    assert all(": skipped, already done" in l for l in lines[:4]), lines
    assert os.path.join(out, "eval") in lines[4]


# tool -> the flags its --help must list and those it must not (it does not honour them).
TOOL_FLAGS = {
    "stage1_train.py": ({"--config-file", "--resume", "--num-gpus"}, {"--eval-only"}),
    "stage2_train.py": ({"--config-file", "--resume", "--num-gpus"}, {"--eval-only"}),
    "stage3_train.py": ({"--config-file", "--resume", "--eval-only", "--num-gpus"}, set()),
    "run_net.py": ({"--config-file", "--resume", "--eval-only", "--num-gpus"}, set()),
    "lazy_train_net.py": ({"--config-file", "--resume", "--eval-only", "--num-gpus"}, set()),
    "pipeline.py": (
        {"--config-dir", "--output-dir", "--make-toy-data", "--num-gpus"},
        {"--config-file", "--resume", "--eval-only"},
    ),
}


def test_tools_show_their_own_help_and_only_the_flags_they_honour():
    import ast
    import re

    # All tools at once: each process spends its seconds importing torch and Detectron2.
    procs = {
        tool: subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tools", tool), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tool in TOOL_FLAGS
    }
    for tool, (listed, hidden) in TOOL_FLAGS.items():
        path = os.path.join(REPO, "tools", tool)
        stdout, stderr = procs[tool].communicate(timeout=300)
        out = subprocess.CompletedProcess(procs[tool].args, procs[tool].returncode, stdout, stderr)
        assert out.returncode == 0, (tool, out.stderr[-500:])
        first_line = ast.get_docstring(ast.parse(open(path).read())).splitlines()[0]
        assert first_line in " ".join(out.stdout.split("\n")), tool  # its own description, not Detectron2's
        flags = set(re.findall(r"(--[a-z][a-z-]+)", out.stdout))
        assert listed <= flags and not (hidden & flags), (tool, flags)
