"""Training hooks and event writers afigan adds to Detectron2's."""

import datetime
import logging

from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

from afigan.seeding import MODEL, seed_all_rngs

__all__ = [
    "FinalCheckpointer",
    "checkpoint_keep",
    "NamedLRScheduler",
    "SeedEachIteration",
    "TotalsPrinter",
    "non_finite_loss_error",
]


class FinalCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's PeriodicCheckpointer (``model_{iter:07d}.pth`` every ``period`` iterations,
    only the last ``max_to_keep`` of them kept, ``model_final.pth`` at the end) that does not also
    write a periodic copy of the final checkpoint when the last iteration falls on the period."""

    def step(self, iteration: int, **kwargs) -> None:
        if self.max_iter is not None and int(iteration) >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=int(iteration), **kwargs)
            return
        super().step(iteration, **kwargs)


def checkpoint_keep(cfg):
    """``SOLVER.CHECKPOINT_KEEP`` as fvcore's ``max_to_keep`` (None = keep every periodic checkpoint)."""
    keep = cfg.SOLVER.CHECKPOINT_KEEP
    return keep if keep > 0 else None


class NamedLRScheduler(hooks.LRScheduler):
    """Detectron2's LRScheduler hook, logging the learning rate as ``lr_<name>`` so two
    optimisers (G and D) do not overwrite each other's value."""

    def __init__(self, optimizer, scheduler, name: str, enabled: bool = True):
        super().__init__(optimizer, scheduler)
        self._name = name
        self._enabled = enabled

    def after_step(self):
        lr = self._optimizer.param_groups[self._best_param_group_id]["lr"]
        self.trainer.storage.put_scalar(f"lr_{self._name}", lr, smoothing_hint=False)
        if self._enabled:
            self.scheduler.step()


class SeedEachIteration(hooks.HookBase):
    """Seed the global RNGs from (SEED, iteration, rank) before every step (the ``MODEL`` stream
    of :mod:`afigan.seeding`), so random choices inside the model (RPN / RoI sampling) depend
    only on the iteration and a resumed run repeats an uninterrupted one exactly."""

    def __init__(self, seed: int):
        self._seed = seed

    def before_step(self):
        seed_all_rngs(self._seed, self.trainer.iter, comm.get_rank(), MODEL)


class TotalsPrinter(EventWriter):
    """The console line of stages 1-2: iteration, ETA, every ``*_total_loss``, every ``lr_*`` and
    the time per iteration. Detectron2's ``CommonMetricPrinter`` prints every key with "loss" in
    it (22+ per-level terms here) and a "lr" key these stages do not have; the per-level terms
    still go to metrics.json and TensorBoard."""

    def __init__(self, max_iter: int, window_size: int = 20):
        self.logger = logging.getLogger("afigan")
        self._max_iter, self._window_size = max_iter, window_size

    def write(self):
        storage = get_event_storage()
        iteration = storage.iter
        if iteration == self._max_iter:  # written once more after training ends
            return
        histories = storage.histories()
        parts = []
        if "time" in histories and iteration < self._max_iter:
            eta = histories["time"].global_avg() * (self._max_iter - iteration - 1)
            parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
        parts.append(f"iter: {iteration}")
        parts += [
            f"{k}: {v.median(self._window_size):.4g}" for k, v in sorted(histories.items()) if k.endswith("total_loss")
        ]
        parts += [f"{k}: {v.latest():.5g}" for k, v in sorted(histories.items()) if k.startswith("lr_")]
        for key in ("time", "data_time"):
            if key in histories:
                parts.append(f"{key}: {histories[key].global_avg():.4f}")
        self.logger.info("  ".join(parts))


def non_finite_loss_error(losses, iteration: int, checkpointers, prefix: str = "") -> FloatingPointError:
    """The FloatingPointError for a non-finite loss at ``iteration``, in one sentence: which
    loss terms are not finite and which checkpoint is the last good one (the check runs before the
    optimiser step, so no saved file holds the bad values)."""
    import math

    bad = []
    for name, value in losses.items():
        v = float(value.detach().float().cpu()) if hasattr(value, "detach") else float(value)
        if not math.isfinite(v):
            bad.append(f"{prefix}{name} = {v}")
    bad = bad or [f"{prefix}total_loss (on another rank)"]
    kept = [c.get_checkpoint_file() for c in checkpointers if c.has_checkpoint()]
    kept = " and ".join(repr(k) for k in kept) if kept else "none (no checkpoint was written yet)"
    return FloatingPointError(
        f"Loss became infinite or NaN at iteration={iteration}: {', '.join(bad)}; training stopped before the "
        f"optimiser step, the last good checkpoint is {kept}: lower SOLVER.BASE_LR (or set "
        "SOLVER.CLIP_GRADIENTS.ENABLED "
        f"True) and continue with --resume."
    )
