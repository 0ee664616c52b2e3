"""Training hooks afigan adds to Detectron2's."""
from detectron2.engine import hooks

__all__ = ["FinalCheckpointer", "checkpoint_keep"]


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
