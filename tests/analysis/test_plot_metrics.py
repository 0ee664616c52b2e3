"""tools/plot_metrics.py (afigan/analysis/metrics.py), its call at the end of the pipeline, and the
TensorBoard event files of stages 1-2 (Detectron2's default writers, afigan/engine/adversarial.py)."""

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("matplotlib")

from d2_helpers import CONFIGS, REPO  # noqa: E402
from PIL import Image  # noqa: E402
from stage_helpers import save_teacher, stage_cfg  # noqa: E402

from afigan.analysis.metrics import find_metrics, plot_metrics, read_metrics  # noqa: E402
from afigan.engine import Stage1Trainer  # noqa: E402
from afigan.engine import pipeline as pipeline_module  # noqa: E402
from afigan.engine.pipeline import Pipeline  # noqa: E402

PANEL_PX = 380  # figsize height per panel (3.8 in) x 100 dpi, afigan/analysis/metrics.py


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A 21-iteration toy stage-1 run (its PeriodicWriter writes at iterations 19 and 20)."""
    out = tmp_path_factory.mktemp("stage1")
    teacher = save_teacher(str(tmp_path_factory.mktemp("teacher") / "teacher.pth"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = stage_cfg(
            "toy/pipeline/stage1.yaml",
            str(out),
            "MODEL.GUIDE_WEIGHTS",
            teacher,
            "SOLVER.MAX_ITER",
            21,
            "SOLVER.CHECKPOINT_PERIOD",
            100,
        )
        trainer = Stage1Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(n)
    return str(out)


def test_stage1_writes_tensorboard_events_and_metrics(stage1_run):
    events = glob.glob(os.path.join(stage1_run, "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 100
    records = read_metrics(os.path.join(stage1_run, "metrics.json"))
    assert [r["iteration"] for r in records] == [19, 20]
    assert {"G_total_loss", "D_total_loss", "lr_G", "lr_D"} <= set(records[0])


def test_plot_of_a_stage_folder(stage1_run, tmp_path):
    png = plot_metrics(stage1_run, str(tmp_path / "one.png"))
    assert png == str(tmp_path / "one.png") and os.path.getsize(png) > 20_000
    assert Image.open(png).size[1] == PANEL_PX  # one panel
    assert plot_metrics(stage1_run) == os.path.join(stage1_run, "metrics.png")


def _pipeline_layout(root, stage1_run):
    """stage1 = the real run's metrics; stage3 = a detector's losses, lr and two evaluations,
    written as a resumed run does (iteration 39 twice) with a half-written last line."""
    os.makedirs(os.path.join(root, "stage1"))
    os.makedirs(os.path.join(root, "stage3"))
    os.makedirs(os.path.join(root, "eval"))  # no metrics.json: not a panel
    shutil.copy(os.path.join(stage1_run, "metrics.json"), os.path.join(root, "stage1", "metrics.json"))
    lines = [
        {"iteration": i, "total_loss": 2.0 / (i + 1), "loss_cls": 1.0 / (i + 1), "lr": 0.01 * min(1, i / 20)}
        for i in range(19, 60, 20)
    ]
    lines.insert(2, {"iteration": 39, "total_loss": 99.0, "lr": 0.5})  # the resumed run's copy wins
    lines += [{"iteration": 40, "bbox/AP": 3.5, "segm/AP": 2.5}, {"iteration": 60, "bbox/AP": 7.0, "segm/AP": 6.0}]
    with open(os.path.join(root, "stage3", "metrics.json"), "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 61, "total_lo')


def test_pipeline_layout_one_panel_per_stage(stage1_run, tmp_path):
    _pipeline_layout(tmp_path, stage1_run)
    assert [name for name, _ in find_metrics(str(tmp_path))] == ["stage1", "stage3"]
    records = read_metrics(str(tmp_path / "stage3" / "metrics.json"))
    assert [r["iteration"] for r in records] == [19, 39, 40, 59, 60]
    assert records[1]["total_loss"] == 99.0 and records[1]["loss_cls"] == pytest.approx(1 / 40)
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    png = tmp_path / "metrics.png"
    assert out.stdout.strip() == f"wrote {png}"
    assert os.path.getsize(png) > 30_000 and Image.open(png).size[1] == 2 * PANEL_PX


def test_folder_without_metrics_says_so(tmp_path):
    (tmp_path / "stage1").mkdir()
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"plot_metrics: No metrics.json in {str(tmp_path)!r} or its sub-folders: nothing to plot (give a stage's "
        f"OUTPUT_DIR or a pipeline's --output-dir after training)."
    ]
    assert not os.path.exists(tmp_path / "metrics.png")


@pytest.fixture
def finished_pipeline(tmp_path, stage1_run, monkeypatch, caplog):
    """A pipeline folder whose every stage is done (final files present, no settings records: it
    is reused with a warning), with its evaluation stubbed out: Pipeline.run only skips stages,
    evaluates and writes its results and plot."""
    _pipeline_layout(tmp_path, stage1_run)
    args = argparse.Namespace(num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")
    pipe = Pipeline(os.path.join(CONFIGS, "toy", "pipeline"), str(tmp_path), args)
    for files in pipe.final.values():
        for f in files:
            os.makedirs(os.path.dirname(f), exist_ok=True)
            open(f, "w").close()
    monkeypatch.setattr(Pipeline, "evaluate", lambda self, *a, **k: {"bbox": {"AP": 7.0}})
    status = logging.getLogger("afigan_pipeline")
    status.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="afigan_pipeline")
    yield pipe
    status.removeHandler(caplog.handler)


def test_pipeline_plots_its_metrics_at_the_end(finished_pipeline, tmp_path, caplog):
    assert finished_pipeline.run() == {"bbox": {"AP": 7.0}}
    png = tmp_path / "metrics.png"
    assert os.path.getsize(png) > 30_000 and Image.open(png).size[1] == 2 * PANEL_PX
    assert f"metrics: training curves plotted in {png}" in caplog.messages


def test_pipeline_without_matplotlib_logs_one_line_and_goes_on(finished_pipeline, tmp_path, caplog, monkeypatch):
    def no_matplotlib(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(pipeline_module, "plot_metrics", no_matplotlib)
    assert finished_pipeline.run() == {"bbox": {"AP": 7.0}}
    assert os.path.isfile(tmp_path / "results.json") and not os.path.exists(tmp_path / "metrics.png")
    assert [m for m in caplog.messages if m.startswith("metrics:")] == [
        "metrics: no plot (ImportError: No module named 'matplotlib')"
    ]
