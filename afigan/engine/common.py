"""Pieces shared by the stage trainers: config setup, hooks, writers, loss checks, AMP."""
import logging
import math
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2.engine import default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger

from afigan.config import add_afigan_config, fallback_syncbn

__all__ = ["setup_cfg", "check_finite", "NamedLRScheduler", "SeedEachIteration", "default_writers", "require_file",
           "GradScalerOrNone", "backward_and_step", "write_metrics", "wrap_ddp"]

logger = logging.getLogger(__name__)


def setup_cfg(args, stage: str = ""):
    """get_cfg() + add_afigan_config + ``--config-file`` + trailing overrides, SyncBN fallback,
    then Detectron2's ``default_setup`` (logging, output dir, seeds, config dump)."""
    cfg = get_cfg()
    add_afigan_config(cfg)
    if args.config_file:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist.")
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        logging.getLogger(__name__).warning("CUDA is not available: running on CPU (MODEL.DEVICE cpu).")
        cfg.MODEL.DEVICE = "cpu"
    if stage:
        cfg.MODEL.AFI.STAGE = stage
    fallback_syncbn(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures Detectron2's and fvcore's loggers; afigan's own INFO lines (weights
    # loaded, legacy switches, stage progress) need theirs.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="afigan", abbrev_name="afigan")
    return cfg


def require_file(path: str, key: str) -> str:
    """Return ``path`` if it is an existing file, else raise one sentence naming the config key."""
    if not path:
        raise ValueError(f"{key} is empty; set it to the path of the checkpoint this stage starts from.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file {path!r} does not exist.")
    return path


def check_finite(losses: Dict[str, torch.Tensor], iteration: int) -> None:
    """Stop with a sentence naming the first non-finite loss; nothing is saved after it.

    One device-to-host sync for the whole dict; the loop that finds the name runs only on failure."""
    if bool(torch.stack([v.detach().float() for v in losses.values()]).isfinite().all()):
        return
    for name, value in losses.items():
        if not math.isfinite(float(value.detach())):
            raise FloatingPointError(
                f"Loss {name!r} became {float(value.detach())} at iteration {iteration}; training stopped and the last "
                f"checkpoint written before this iteration is kept (lower SOLVER.BASE_LR or check the data)."
            )


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
    """Seed Python, NumPy and torch from (SEED, iteration, rank) before every step.

    Random choices inside the model (RPN / ROI sampling) then depend only on the iteration, so
    a resumed run repeats an uninterrupted one exactly (the data stream is seeded the same way,
    see afigan.data.loader)."""

    def __init__(self, seed: int):
        self._seed = max(int(seed), 0)

    def before_step(self):
        state = np.random.SeedSequence([self._seed, 1 + self.trainer.iter, comm.get_rank()]).generate_state(2)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))
        torch.manual_seed(int(state[1]))


def default_writers(output_dir: str, max_iter: int) -> List:
    """Console, metrics.json and (when the tensorboard package is installed) TensorBoard."""
    writers = [CommonMetricPrinter(max_iter), JSONWriter(os.path.join(output_dir, "metrics.json"))]
    try:
        from detectron2.utils.events import TensorboardXWriter

        writers.append(TensorboardXWriter(output_dir))
    except Exception:  # noqa: BLE001 - tensorboard is optional
        pass
    return writers


class GradScalerOrNone:
    """AMP on CUDA when ``SOLVER.AMP.ENABLED``; a no-op otherwise (CPU runs stay float32)."""

    def __init__(self, cfg, device: torch.device):
        self.enabled = bool(cfg.SOLVER.AMP.ENABLED) and device.type == "cuda"
        if cfg.SOLVER.AMP.ENABLED and not self.enabled:
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s; training in float32.", device)
        self.device_type = device.type
        self.dtype = torch.bfloat16 if cfg.SOLVER.AMP.get("PRECISION", "float16") == "bfloat16" else torch.float16

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def scaler(self) -> Optional["torch.amp.GradScaler"]:
        return torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None


def backward_and_step(loss: torch.Tensor, optimizer, scaler=None) -> None:
    """zero_grad, backward (scaled under AMP), step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def write_metrics(storage, losses: Dict[str, torch.Tensor], **scalars) -> None:
    """Average the losses over ranks (a collective call) and log them on the main process."""
    reduced = comm.reduce_dict({k: v.detach().float() for k, v in losses.items()}, average=True)
    if comm.is_main_process():
        storage.put_scalars(**{k: float(v) for k, v in reduced.items()}, **scalars)


def wrap_ddp(module: torch.nn.Module, broadcast_buffers: bool = False) -> torch.nn.Module:
    """DistributedDataParallel when several processes run (on GPUs or, with gloo, on CPUs);
    the module itself otherwise. Detectron2's ``create_ddp_model`` always passes ``device_ids``,
    which DDP rejects for CPU modules."""
    if comm.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(module.parameters()).device.type == "cuda"
    return DistributedDataParallel(module, device_ids=[comm.get_local_rank()] if on_gpu else None,
                                   broadcast_buffers=broadcast_buffers)

