"""Faults injected into real runs: a kill while a checkpoint is written, a full disk, a stage (and
the pipeline) killed at a random iteration and resumed, one of two processes raising, the
pipeline stopped between two stages. The random choices come from AFIGAN_FAULT_SEED (default:
a fresh seed, shown in every assertion message, so a failure can be replayed)."""

import argparse
import contextlib
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("detectron2")

from conftest import one_sentence_error  # noqa: E402
from d2_helpers import CONFIGS, REPO  # noqa: E402
from stage_helpers import TINY, StopAt, params, save_teacher, stage_cfg  # noqa: E402

S3 = os.path.join(CONFIGS, "toy", "pipeline", "stage3.yaml")
TINY_OPTS = [str(o) for o in TINY]
SEED = int(os.environ.get("AFIGAN_FAULT_SEED") or random.SystemRandom().randrange(10**6))
RNG = random.Random(SEED)


def _stage3_argv(out, *opts):
    return [
        "--config-file",
        S3,
        *TINY_OPTS,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        3,
        "SOLVER.CHECKPOINT_PERIOD",
        1,
        "DATASETS.TEST",
        "()",
        *opts,
    ]


def _loads(path):
    state = torch.load(path, weights_only=False)
    assert "model" in state and "iteration" in state
    return state


# --- (a) SIGKILL while a checkpoint is being written ----------------------------------------

CHILD = textwrap.dedent('''
    import contextlib, sys, time
    import afigan.checkpoint as ck
    flag, argv = sys.argv[1], sys.argv[2:]
    original, saves = ck.atomic_open, []

    class Stalling:
        """Half of the second checkpoint reaches the disk, then the process stalls (and is killed)."""
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.f.write(b)
            self.n += len(b)
            if self.n > 50000:
                self.f.flush()
                open(flag, "w").close()
                time.sleep(300)
            return len(b)
        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def stalling_open(path, mode="wb"):
        with original(path, mode) as f:
            saves.append(path)
            yield Stalling(f) if path.endswith(".pth") and len([p for p in saves if p.endswith(".pth")]) == 2 else f

    ck.atomic_open = stalling_open
    from afigan.engine.cli import launch_stage
    launch_stage("stage3", "", argv)
''')


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_continues(tool, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "writing"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(flag), *map(str, _stage3_argv(out))],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not flag.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), child.communicate()[1][-3000:] if child.poll() is not None else "no second checkpoint write"
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert _loads(out / "model_0000000.pth")["iteration"] == 0
    assert not (out / "model_0000001.pth").exists()  # the half-written file never got its name
    assert len(glob.glob(str(out / ".model_0000001.pth.*.tmp"))) == 1  # it is still there, under a temporary name
    code, err, everything = tool("stage3", "--resume", *_stage3_argv(out))
    assert code == 0, everything[-3000:]
    assert "Starting training from iteration 1" in everything
    assert _loads(out / "model_final.pth")["iteration"] == 2
    assert not glob.glob(str(out / ".*.tmp"))  # the next write of that checkpoint removed it


# --- (b) no space left on the device ------------------------------------------------------


def test_disk_full_during_a_save_is_one_sentence_and_keeps_the_previous_checkpoint(tool, tmp_path, monkeypatch):
    import afigan.checkpoint as ck

    original, saves = ck.atomic_open, []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def full_disk(path, mode="wb"):
        with original(path, mode) as f:
            saves.append(path)
            yield Full(f) if path.endswith("model_0000001.pth") else f

    monkeypatch.setattr(ck, "atomic_open", full_disk)
    out = tmp_path / "out"
    code, err, everything = tool("stage3", *_stage3_argv(out))
    assert code == 1 and "Traceback" not in everything, everything[-3000:]
    s = one_sentence_error(err)
    assert s == (
        f"Cannot write checkpoint '{out / 'model_0000001.pth'}' (the disk is full); the previous checkpoint "
        f"'{out / 'model_0000000.pth'}' is intact: free space or choose another OUTPUT_DIR, then resume with --resume."
    )
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert _loads(out / "model_0000000.pth")["iteration"] == 0
    assert not glob.glob(str(out / ".*.tmp")) and not (out / "model_0000001.pth").exists()


# --- (c) a stage killed at a random iteration and resumed ----------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A teacher and a 1-iteration stage-1 G / D pair (inputs of stage 2)."""
    from afigan.engine import Stage1Trainer

    root = tmp_path_factory.mktemp("chain")
    teacher = save_teacher(str(root / "teacher.pth"))
    t = Stage1Trainer(
        stage_cfg("toy/pipeline/stage1.yaml", str(root / "s1"), "MODEL.GUIDE_WEIGHTS", teacher, "SOLVER.MAX_ITER", 1)
    )
    t.resume_or_load(resume=False)
    t.train()
    return {
        "teacher": teacher,
        "G": str(root / "s1" / "G_0" / "model_final.pth"),
        "D": str(root / "s1" / "D_0" / "model_final.pth"),
    }


def _trainer(stage, out, chain):
    from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer

    opts = ["SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1]
    torch.manual_seed(0)
    if stage == "stage3":
        return DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(out), *opts, "DATASETS.TEST", ()))
    teacher = ["MODEL.GUIDE_WEIGHTS", chain["teacher"]]
    if stage == "stage1":
        return Stage1Trainer(stage_cfg("toy/pipeline/stage1.yaml", str(out), *opts, *teacher))
    return Stage2Trainer(
        stage_cfg(
            "toy/pipeline/stage2.yaml",
            str(out),
            *opts,
            *teacher,
            "MODEL.WEIGHTS",
            chain["teacher"],
            "MODEL.AFI_GEN_WEIGHTS",
            chain["G"],
            "MODEL.AFI_DIS_WEIGHTS",
            chain["D"],
        )
    )


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_stage_killed_at_a_random_iteration_and_resumed_equals_an_uninterrupted_run(tmp_path, chain, stage):
    kill = RNG.randrange(0, 2)  # after iteration 0 or 1 of 0..2
    why = f"{stage} killed after iteration {kill} (AFIGAN_FAULT_SEED={SEED})"
    full = _trainer(stage, tmp_path / "full", chain)
    full.resume_or_load(resume=True)
    full.train()
    part = _trainer(stage, tmp_path / "part", chain)
    part.register_hooks([StopAt(kill)])
    part.resume_or_load(resume=True)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = _trainer(stage, tmp_path / "part", chain)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == kill + 1, why
    resumed.train()
    for net in ("model", "D") if stage != "stage3" else ("model",):
        a, b = params(getattr(full, net)), params(getattr(resumed, net))
        assert a.keys() == b.keys()
        for k in a:
            # Same batches, seeds and optimiser state: equal up to float reordering in BLAS.
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (why, net, k)


# --- (c) and (e): the pipeline stopped between two stages, then inside one, then resumed -----


def _pipeline_opts(out):
    return [
        "--config-dir",
        os.path.join(CONFIGS, "toy", "pipeline"),
        "--output-dir",
        out,
        *TINY_OPTS,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.CHECKPOINT_PERIOD",
        1,
    ]


def _status(everything):
    return [l[len("[pipeline] ") :] for l in everything.splitlines() if l.startswith("[pipeline] ")]


def test_pipeline_interrupted_between_stages_and_inside_one_resumes_to_the_same_weights(tool, tmp_path, monkeypatch):
    from detectron2.engine import TrainerBase

    from afigan.engine.pipeline import Pipeline

    code, err, everything = tool("pipeline", *_pipeline_opts(tmp_path / "full"))
    assert code == 0, everything[-3000:]

    # (e) stopped after stage 1 finished, before stage 2 started.
    original_run_stage = Pipeline.run_stage

    def stop_before_stage2(self, stage, *args, **kwargs):
        if stage == "stage2":
            raise KeyboardInterrupt
        return original_run_stage(self, stage, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run_stage", stop_before_stage2)
    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        tool("pipeline", *_pipeline_opts(out))
    monkeypatch.setattr(Pipeline, "run_stage", original_run_stage)

    # (c) killed inside stage 2 or 3 (chosen at random) after its first iteration; the per-stage test
    # above varies the iteration (two iterations per stage keep this four-stage test short).
    stage, kill = RNG.choice(["stage2", "stage3"]), 0
    why = f"pipeline killed in {stage} after iteration {kill} (AFIGAN_FAULT_SEED={SEED})"
    original_after_step = TrainerBase.after_step

    def killed_after_step(self):
        original_after_step(self)
        if self.cfg.MODEL.AFI.STAGE == stage and self.iter == kill:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainerBase, "after_step", killed_after_step)
    with pytest.raises(KeyboardInterrupt):
        tool("pipeline", *_pipeline_opts(out))
    monkeypatch.setattr(TrainerBase, "after_step", original_after_step)

    code, err, everything = tool("pipeline", *_pipeline_opts(out))
    assert code == 0, everything[-3000:]
    lines = _status(everything)
    assert [l.split(":")[0] for l in lines[:4]] == ["stage0", "stage1", "stage2", "stage3"], (why, lines)
    assert all(": skipped, already done" in l for l in lines[:2]), (why, lines)
    assert f"{stage}: resuming at iteration {kill + 1} in float32: " in "\n".join(lines), (why, lines)
    if stage == "stage3":
        assert ": skipped, already done" in lines[2], (why, lines)
    for folder in ("stage2/AFExtractor", "stage2/Disc", "stage3"):
        a = _loads(tmp_path / "full" / folder / "model_final.pth")["model"]
        b = _loads(out / folder / "model_final.pth")["model"]
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (why, folder, k)
    assert json.load(open(out / "results.json")).keys() == json.load(open(tmp_path / "full" / "results.json")).keys()


# --- (d) one of two processes raises --------------------------------------------------------


def rank1_fails(args):
    """Rank 1 raises an input error while rank 0 waits for it in a collective."""
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        raise ValueError("MODEL.AFI.LEVELS: rank 1 found a bad value; fix the config.")
    comm.synchronize()


def test_one_rank_raising_ends_both_processes_with_its_error(capsys):
    from afigan.engine.cli import _launch, run_tool

    args = argparse.Namespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto", debug=False)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run_tool(_launch, args, rank1_fails, args)
    assert e.value.code == 1 and time.time() - t0 < 120  # no hang: rank 0 is ended, not left in its barrier
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert one_sentence_error(err) == "rank 1 of 2: MODEL.AFI.LEVELS: rank 1 found a bad value; fix the config."
