"""The Detectron2 behaviour that afigan's DetectorTrainer relies on where Detectron2 has no public
extension point (afigan/engine/detector.py). Each test pins one such behaviour, so a Detectron2
upgrade that changes it fails here, naming what to revisit, instead of breaking training silently."""

import ast
import inspect
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, defaults  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from afigan.engine.detector import AutocastTrainer, DetectorTrainer, StepTrainer  # noqa: E402
from afigan.engine.parallel import ddp  # noqa: E402

# What DefaultTrainer.__init__ sets on self: DetectorTrainer.__init__ repeats its steps and must set
# each of them (DefaultTrainer's train/run_step/state_dict and its model/data_loader/optimizer
# properties read them).
D2_INIT_ATTRIBUTES = {"_trainer", "scheduler", "checkpointer", "start_iter", "max_iter", "cfg"}


def _body(fn) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]


def _self_assignments(fn) -> set:
    return {
        t.attr
        for node in ast.walk(_body(fn))
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }


def _calls(fn) -> list:
    """The dotted names of the calls in ``fn``, in source order."""
    calls = [n for n in ast.walk(_body(fn)) if isinstance(n, ast.Call)]
    return [ast.unparse(c.func) for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


def test_default_trainer_init_sets_what_detector_trainer_repeats():
    assert _self_assignments(DefaultTrainer.__init__) == D2_INIT_ATTRIBUTES, (
        "DefaultTrainer.__init__ sets other attributes now: make DetectorTrainer.__init__ set them too"
    )
    steps = [c for c in _calls(DefaultTrainer.__init__) if c.startswith(("self.", "DefaultTrainer.", "create_ddp"))]
    assert steps == [
        "DefaultTrainer.auto_scale_workers",
        "self.build_model",
        "self.build_optimizer",
        "self.build_train_loader",
        "create_ddp_model",
        "self.build_lr_scheduler",
        "self.register_hooks",
        "self.build_hooks",
    ]
    assert _self_assignments(DetectorTrainer.__init__) >= D2_INIT_ATTRIBUTES
    # run_step hands the iteration to the inner trainer; data_loader is a property forwarding to it
    # (DetectorTrainer.train sets the loader through it once the start iteration is known).
    assert [ast.unparse(s) for s in _body(DefaultTrainer.run_step).body] == [
        "self._trainer.iter = self.iter",
        "self._trainer.run_step()",
    ]
    assert isinstance(inspect.getattr_static(DefaultTrainer, "data_loader"), property)


def test_create_ddp_model_gives_a_cpu_module_the_local_rank_which_ddp_rejects(monkeypatch, tmp_path):
    """Why DetectorTrainer cannot use DefaultTrainer.__init__ (and every trainer calls
    :func:`afigan.engine.parallel.ddp`): Detectron2 fills ``device_ids`` with the local rank."""
    made = []
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_local_rank", lambda: 0)
    monkeypatch.setattr(defaults, "DistributedDataParallel", lambda module, **kw: made.append(kw) or module)
    defaults.create_ddp_model(nn.Linear(2, 2), broadcast_buffers=False)
    ddp(nn.Linear(2, 2))
    assert made == [
        {"broadcast_buffers": False, "device_ids": [0]},  # Detectron2's default, for any module
        {"device_ids": None, "broadcast_buffers": False},  # afigan's, for a CPU module
    ]
    monkeypatch.undo()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="device_ids"):
            torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2), device_ids=[0])
    finally:
        dist.destroy_process_group()


def test_amp_trainer_requires_cuda(monkeypatch):
    """Why the AMP step is afigan's own (AutocastTrainer): Detectron2's asserts CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _TwoLosses()
    step = AMPTrainer(model, [None], torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=object())
    with pytest.raises(AssertionError, match="CUDA is required"):
        step.run_step()


class _TwoLosses(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.value = value

    def forward(self, data):
        return {"loss_a": (self.w * self.value).sum(), "loss_b": self.w.abs().sum() * 0.5}


def _one_step(trainer, iteration: int = 0):
    with EventStorage(iteration) as storage:
        trainer.storage = storage
        trainer.iter = iteration
        trainer.run_step()
    return storage


def test_simple_trainer_checks_the_losses_in_write_metrics_before_the_optimiser_step():
    """Detectron2's float32 step (run unchanged by StepTrainer) hands the model's loss dict to
    ``_write_metrics(loss_dict, data_time)``, which writes these metric names and raises
    FloatingPointError for a non-finite total before ``optimizer.step()``; StepTrainer overrides
    only that method, to word the error."""
    assert list(inspect.signature(SimpleTrainer._write_metrics).parameters) == [
        "self",
        "loss_dict",
        "data_time",
        "prefix",
        "iter",
    ]
    assert StepTrainer.run_step is SimpleTrainer.run_step
    model = _TwoLosses()
    trainer = StepTrainer(model, [None] * 2, torch.optim.SGD(model.parameters(), lr=0.1))
    storage = _one_step(trainer)
    assert set(storage.histories()) == {"data_time", "rank_data_time", "total_loss", "loss_a", "loss_b"}
    assert storage.histories()["total_loss"].latest() == pytest.approx(3.0)  # 2 + 0.5 * 2
    assert model.w.item() == pytest.approx(2.0 - 0.1 * 1.5)  # the step ran

    model.value = float("nan")
    with pytest.raises(FloatingPointError) as e:
        _one_step(trainer, 1)
    assert str(e.value) == (
        "Loss became infinite or NaN at iteration=1: loss_a = nan; training stopped before the optimiser step, "
        "the last good checkpoint is none (no checkpoint was written yet): lower SOLVER.BASE_LR (or set "
        "SOLVER.CLIP_GRADIENTS.ENABLED True) and continue with --resume."
    )
    assert model.w.item() == pytest.approx(1.85)  # no optimiser step with the bad loss


def test_detector_trainer_hooks_and_inner_trainer(tmp_path):
    from stage_helpers import stage_cfg

    trainer = DetectorTrainer(stage_cfg("toy/pipeline/stage3.yaml", str(tmp_path)))
    assert set(vars(trainer)) >= D2_INIT_ATTRIBUTES
    assert type(trainer._trainer) is StepTrainer and trainer._trainer.checkpointers == [trainer.checkpointer]
    # DefaultTrainer.build_hooks' list (PreciseBN off), with the checkpointer replaced and the
    # per-iteration seeding first.
    assert [type(h).__name__ for h in trainer._hooks] == [
        "SeedEachIteration",
        "IterationTimer",
        "LRScheduler",
        "FinalCheckpointer",
        "EvalHook",
        "PeriodicWriter",
    ]
    assert trainer.data_loader is None  # built by train(), from the start iteration
    assert issubclass(AutocastTrainer, StepTrainer)
