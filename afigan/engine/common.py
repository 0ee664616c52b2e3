"""Pieces shared by the stage trainers: config setup, hooks, AMP policy, DDP wrapping."""
import contextlib
import logging
import os
import sys

import torch

from detectron2.config import get_cfg
from detectron2.engine import create_ddp_model, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from afigan.config import add_afigan_config, fallback_syncbn
from afigan.seeding import MODEL, seed_all_rngs

__all__ = ["setup_cfg", "require_file", "NamedLRScheduler", "SeedEachIteration", "AMPPolicy", "backward_and_step",
           "ddp"]

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
        logger.warning("CUDA is not available: running on CPU (MODEL.DEVICE cpu).")
        cfg.MODEL.DEVICE = "cpu"
    if stage:
        cfg.MODEL.AFI.STAGE = stage
    fallback_syncbn(cfg)
    cfg.freeze()
    with _without_config_dumps():
        default_setup(cfg, args)
    # default_setup configures Detectron2's and fvcore's loggers; afigan's own INFO lines (weights
    # loaded, legacy switches, stage progress) need theirs.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="afigan", abbrev_name="afigan",
                 color=sys.stdout.isatty())
    if not sys.stdout.isatty():
        _plain_console("detectron2", "fvcore")
    changed = config_changes(cfg)
    logger.info("Config: %d keys differ from the defaults (the full config is %s):\n%s", len(changed),
                os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "\n".join(f"  {k}: {v!r}" for k, v in changed))
    return cfg


_DUMPS = ("Running with full config", "Contents of args.config_file")


def _drop_config_dumps(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_DUMPS)


@contextlib.contextmanager
def _without_config_dumps():
    """default_setup logs the YAML file and the whole config (~450 coloured lines per stage);
    it still writes OUTPUT_DIR/config.yaml, and setup_cfg logs only what differs from the defaults."""
    d2 = logging.getLogger("detectron2")
    d2.addFilter(_drop_config_dumps)
    try:
        yield
    finally:
        d2.removeFilter(_drop_config_dumps)


def _plain_console(*names: str) -> None:
    # Detectron2's setup_logger always colours its console lines; a log piped to a file should not
    # carry escape codes.
    plain = logging.Formatter("[%(asctime)s %(name)s %(levelname)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
                handler.setFormatter(plain)


def config_changes(cfg):
    """``[(KEY, value)]`` of every key whose value differs from get_cfg() + add_afigan_config."""
    default = add_afigan_config(get_cfg())

    def walk(node, ref, prefix):
        for key, value in node.items():
            other = ref.get(key, None) if ref is not None else None
            if hasattr(value, "items"):
                yield from walk(value, other, f"{prefix}{key}.")
            elif value != other:
                yield f"{prefix}{key}", value

    return list(walk(cfg, default, ""))


def require_file(path: str, key: str) -> str:
    """Return ``path`` if it is an existing file, else raise one sentence naming the config key."""
    if not path:
        raise ValueError(f"{key} is empty; set it to the path of the checkpoint this stage starts from.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file {path!r} does not exist.")
    return path


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


class AMPPolicy:
    """Whether and how to run mixed precision: on CUDA when ``SOLVER.AMP.ENABLED`` (float16 with
    gradient scaling, or ``SOLVER.AMP.PRECISION bfloat16``); float32 otherwise, with a warning when
    AMP was asked for on a CPU."""

    def __init__(self, cfg, device: torch.device):
        self.enabled = bool(cfg.SOLVER.AMP.ENABLED) and device.type == "cuda"
        if cfg.SOLVER.AMP.ENABLED and not self.enabled:
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s; training in float32.", device)
        self.device_type = device.type
        self.dtype = torch.bfloat16 if cfg.SOLVER.AMP.get("PRECISION", "float16") == "bfloat16" else torch.float16

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self):
        """A new ``GradScaler`` for float16 on CUDA, else None (no scaling needed)."""
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


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model`` (DDP when several processes run, the module otherwise),
    told the module's device: it fills ``device_ids`` with the local rank when none is given,
    which DDP rejects for a CPU module (multi-process CPU runs use gloo)."""
    on_gpu = next(module.parameters()).device.type == "cuda"
    return create_ddp_model(module, device_ids=[comm.get_local_rank()] if on_gpu else None, broadcast_buffers=False)
