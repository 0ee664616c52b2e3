"""The stale-settings rule (afigan/engine/stage_record.py, applied by afigan/engine/pipeline.py): a
rerun reuses a finished or interrupted stage only when it was started with the same settings and
inputs; otherwise one sentence names the stage, the first differing keys (old -> new) and the two
ways on. The stage trainer is replaced by a stand-in that writes the stage's final files (their
bytes differ on every call, as two trainings' checkpoints do), so no test trains a network; the
toy data set is made again when its generator's settings differ."""

import hashlib
import json
import os
import shutil

import pytest

pytest.importorskip("detectron2")

from conftest import one_sentence_error  # noqa: E402
from d2_helpers import CONFIGS  # noqa: E402

from afigan.config import load_config  # noqa: E402
from afigan.engine import pipeline as pipeline_module  # noqa: E402
from afigan.engine.stages import STAGES, final_files  # noqa: E402

CONFIG_DIR = os.path.join(CONFIGS, "toy", "pipeline")


class FakeTrainer:
    """Stands in for afigan.engine.cli.train_stage / eval_only: records each call and writes the
    stage's final files (or, for ``interrupt``, a last_checkpoint and a KeyboardInterrupt)."""

    def __init__(self):
        self.calls = []  # (stage, OUTPUT_DIR, resume)
        self.interrupt = set()

    def train(self, stage, args):
        cfg = load_config(args.config_file, args.opts)
        self.calls.append((stage, cfg.OUTPUT_DIR, args.resume))
        if stage in self.interrupt:
            self.interrupt.discard(stage)
            folder = os.path.join(cfg.OUTPUT_DIR, STAGES[stage].trainer.checkpoint_dirs[0])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "last_checkpoint"), "w") as f:
                f.write("model_0000002.pth")
            raise KeyboardInterrupt
        for path in final_files(stage, cfg.OUTPUT_DIR):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"stage": stage, "call": len(self.calls), "lr": cfg.SOLVER.BASE_LR}, f)
        return {"bbox": {"AP": 1.0}} if STAGES[stage].evaluates else {}

    def evaluate(self, args):
        return {"bbox": {"AP": 2.0}}

    def trained(self):
        return [stage for stage, _, _ in self.calls]


@pytest.fixture
def fake(monkeypatch):
    f = FakeTrainer()
    monkeypatch.setattr(pipeline_module, "train_stage", f.train)
    monkeypatch.setattr(pipeline_module, "eval_only", f.evaluate)
    return f


def _argv(out, *opts):
    return ["--config-dir", CONFIG_DIR, "--output-dir", out, *opts]


def _sha(path):
    with open(path, "rb") as f:
        data = f.read()
    return f"<file of {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"


def test_a_changed_key_stops_with_one_sentence_naming_the_stage_and_old_to_new(tool, fake, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, _, everything = tool("pipeline", *_argv(out, "SOLVER.BASE_LR", 0.02))
    assert code == 0, everything[-2000:]
    assert fake.trained() == ["stage0", "stage1", "stage2", "stage3"]
    fake.calls.clear()
    code, err, _ = tool("pipeline", *_argv(out, "SOLVER.BASE_LR", 0.03, "SOLVER.MAX_ITER", 7))
    assert code == 1 and fake.calls == []
    assert one_sentence_error(err) == (
        f"stage0 in {os.path.join(out, 'stage0')!r} was started with other settings than this run's: "
        "SOLVER.MAX_ITER 300 -> 7, SOLVER.BASE_LR 0.02 -> 0.03; give a new --output-dir, or add --retrain "
        "stage0 to train stage0 and every later stage again."
    )


def test_keys_that_cannot_change_the_result_and_a_moved_folder_still_skip(tool, fake, tmp_path):
    out = str(tmp_path / "out")
    assert tool("pipeline", *_argv(out))[0] == 0
    record = json.load(open(os.path.join(out, "stage2", "trained_with.json")))
    assert record["stage"] == "stage2" and record["config"]["MODEL.AFI.STAGE"] == "stage2"
    for key in ("OUTPUT_DIR", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD"):
        assert key not in record["config"], key
    gen = os.path.join(out, "stage1", "G_0", "model_final.pth")
    assert record["inputs"]["MODEL.AFI_GEN_WEIGHTS"]["sha256"] == hashlib.sha256(open(gen, "rb").read()).hexdigest()
    fake.calls.clear()
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)  # the checkpoints are compared by content, not by path
    ignored = ["SOLVER.CHECKPOINT_PERIOD", 7, "TEST.EVAL_PERIOD", 3, "MODEL.DEVICE", "cuda", "VIS_PERIOD", 5]
    code, _, everything = tool("pipeline", *_argv(moved, *ignored, "DATALOADER.NUM_WORKERS", 2))
    assert code == 0, everything[-2000:]
    assert fake.trained() == []
    assert everything.count(": skipped, already done") == 4


def test_retrain_flag_retrains_that_stage_and_every_later_one(tool, fake, tmp_path):
    out = str(tmp_path / "out")
    assert tool("pipeline", *_argv(out))[0] == 0
    leftover = os.path.join(out, "stage2", "leftover.txt")
    open(leftover, "w").close()
    fake.calls.clear()
    code, _, everything = tool("pipeline", "--retrain", "stage2", *_argv(out, "SOLVER.BASE_LR", 0.5))
    assert code == 1, everything[-2000:]  # stage0 and stage1 were trained with BASE_LR 0.01: stale
    assert "stage0 in " in everything and fake.calls == []
    code, _, everything = tool("pipeline", "--retrain", "stage2", *_argv(out))
    assert code == 0, everything[-2000:]
    assert fake.trained() == ["stage2", "stage3"]
    assert not os.path.exists(leftover)  # the old stage-2 folder was removed first
    assert f"stage2: retraining (--retrain): removed {os.path.join(out, 'stage2')}" in everything
    fake.calls.clear()
    assert tool("pipeline", *_argv(out))[0] == 0  # the retrained stages are checked like any other
    assert fake.trained() == []


def test_an_earlier_stage_retrained_makes_every_later_stage_stale(tool, fake, tmp_path):
    out = str(tmp_path / "out")
    assert tool("pipeline", *_argv(out))[0] == 0
    g, d = final_files("stage1", os.path.join(out, "stage1"))
    old_g, old_d = _sha(g), _sha(d)
    shutil.rmtree(os.path.join(out, "stage1"))
    fake.calls.clear()
    code, err, _ = tool("pipeline", *_argv(out))
    assert fake.trained() == ["stage1"]  # then stage 2 no longer starts from the same G and D
    assert code == 1
    assert one_sentence_error(err) == (
        f"stage2 in {os.path.join(out, 'stage2')!r} was started with other settings than this run's: "
        f"MODEL.AFI_GEN_WEIGHTS {old_g} -> {_sha(g)}, MODEL.AFI_DIS_WEIGHTS {old_d} -> {_sha(d)}; give a new "
        "--output-dir, or add --retrain stage2 to train stage2 and every later stage again."
    )
    fake.calls.clear()
    assert tool("pipeline", "--retrain", "stage2", *_argv(out))[0] == 0
    assert fake.trained() == ["stage2", "stage3"]


def test_a_resumed_stage_keeps_the_record_it_was_checked_against(tool, fake, tmp_path):
    out = str(tmp_path / "out")
    fake.interrupt = {"stage1"}
    with pytest.raises(KeyboardInterrupt):
        tool("pipeline", *_argv(out))
    record = os.path.join(out, "stage1", "trained_with.json")
    before = os.stat(record)
    # Settings changed since the interrupted start: no resume.
    code, err, _ = tool("pipeline", *_argv(out, "SOLVER.BASE_LR", 0.5))
    assert code == 1 and "stage0 in " in one_sentence_error(err)
    fake.calls.clear()
    code, _, everything = tool("pipeline", *_argv(out))
    assert code == 0, everything[-2000:]
    assert fake.trained() == ["stage1", "stage2", "stage3"]
    assert "stage1: resuming at iteration 3 in float32: " in everything
    after = os.stat(record)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_a_finished_stage_without_a_record_is_reused_with_a_warning(tool, fake, tmp_path):
    out = str(tmp_path / "out")
    assert tool("pipeline", *_argv(out))[0] == 0
    os.remove(os.path.join(out, "stage1", "trained_with.json"))  # as an older afigan left it
    fake.calls.clear()
    code, _, everything = tool("pipeline", *_argv(out))
    assert code == 0 and fake.trained() == []
    folder = os.path.join(out, "stage1")
    assert (
        f"stage1: {folder} has no record of its settings (made by an older afigan), so it is reused unchecked; "
        f"if its settings may differ from this run's, give a new --output-dir or add --retrain stage1 to train "
        f"stage1 and every later stage again" in everything
    )


def test_is_done_applies_the_rule_through_the_public_api(fake, tmp_path):
    import argparse

    out = str(tmp_path / "out")
    args = argparse.Namespace(num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")
    p = pipeline_module.Pipeline(CONFIG_DIR, out, args, ["SOLVER.MAX_ITER", "9"])
    assert p.option("SOLVER.MAX_ITER", "stage3") == 9  # the command line's value
    assert p.option("SOLVER.BASE_LR", "stage3") == 0.01  # the YAML's
    assert not p.is_done("stage0")
    assert p.run_stage("stage0") == {"bbox": {"AP": 1.0}}
    assert p.is_done("stage0") and p.run_stage("stage0") == {}
    assert fake.trained() == ["stage0"]
    with pytest.raises(pipeline_module.StaleStageError, match=r"SOLVER\.MAX_ITER 9 -> 4; "):
        p.is_done("stage0", ["SOLVER.MAX_ITER", "4"])


def test_the_toy_set_is_made_again_when_its_generator_settings_differ(tmp_path):
    from afigan.data.toy_shapes import ensure_toy_dataset, make_toy_dataset, toy_dataset_ready, toy_paths

    root = make_toy_dataset(str(tmp_path / "toy"), num_train=3, num_val=2, seed=1, num_unlabeled=0)
    n_val = lambda: len(json.load(open(toy_paths(root, "val")[0]))["images"])  # noqa: E731
    stamp = os.stat(toy_paths(root, "val")[0]).st_mtime_ns
    ensure_toy_dataset(root, num_train=3, num_val=2, seed=1, num_unlabeled=0)  # the same settings: kept
    assert os.stat(toy_paths(root, "val")[0]).st_mtime_ns == stamp
    assert toy_dataset_ready(root)  # no settings asked for: the set as it was made
    ensure_toy_dataset(root, num_train=3, num_val=4, seed=1, num_unlabeled=0)
    assert n_val() == 4
    assert not toy_dataset_ready(root, num_train=3, num_val=2, seed=1, num_unlabeled=0)
    os.remove(os.path.join(root, "generator_settings.json"))  # a set made before the record existed
    assert not toy_dataset_ready(root)
    ensure_toy_dataset(root, num_train=3, num_val=1, seed=1, num_unlabeled=0)
    assert n_val() == 1 and toy_dataset_ready(root, num_train=3, num_val=1, seed=1, num_unlabeled=0)
