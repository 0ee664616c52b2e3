"""Pieces shared by the stage trainers: config setup, hooks, AMP policy, DDP wrapping."""

import contextlib
import logging
import os
import re
import sys

import torch
from detectron2.engine import create_ddp_model, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from afigan.config import config_changes, device_fallback, fallback_syncbn, load_config
from afigan.seeding import MODEL, seed_all_rngs

__all__ = [
    "setup_cfg",
    "load_cfg",
    "debug_enabled",
    "USER_ERRORS",
    "user_message",
    "require_file",
    "NamedLRScheduler",
    "SeedEachIteration",
    "AMPPolicy",
    "cpu_supports_bfloat16",
    "float32_losses",
    "backward_and_step",
    "ddp",
]

logger = logging.getLogger(__name__)


# The exception types that mean "the input is wrong" (files, keys, values, the disk): the entry
# points print their message as one sentence instead of a traceback (afigan/engine/cli.py). Any
# other type is treated as a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)


def debug_enabled() -> bool:
    """``--debug`` (which sets it) or ``AFIGAN_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get("AFIGAN_DEBUG", "") not in ("", "0")


def user_message(e: BaseException) -> str:
    """The message of a user error as one line (KeyError's str() adds quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if isinstance(e, OSError) and e.errno is not None and e.strerror and e.filename is None:
        msg = e.strerror  # OSError(errno, sentence): str() would prefix "[Errno N]"
    if "Original Traceback (most recent call last):" in msg:
        # Re-raised from a DataLoader worker with the worker's traceback in the message: keep its last line.
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    return " ".join(msg.split())


def load_cfg(args):
    """:func:`afigan.config.load_config` of ``args.config_file`` and ``args.opts``. Not frozen,
    no setup: :func:`setup_cfg` does both."""
    return load_config(args.config_file, args.opts)


def _check_output_dir(path: str) -> None:
    """One sentence when OUTPUT_DIR cannot be created or written (default_setup would raise
    deep inside a path manager)."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(probe) else "is not writable"
        raise PermissionError(
            f"OUTPUT_DIR {path!r} cannot be written: {probe!r} {what}; choose another OUTPUT_DIR "
            f"or fix the permissions."
        )


def setup_cfg(args, stage: str = ""):
    """:func:`load_cfg`, SyncBN fallback, then Detectron2's ``default_setup`` (logging, output
    dir, seeds, config dump)."""
    cfg = device_fallback(load_cfg(args))
    if stage:
        cfg.MODEL.AFI.STAGE = stage
    fallback_syncbn(cfg)
    cfg.freeze()
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        _check_output_dir(cfg.OUTPUT_DIR)
    quiet_third_party()
    with _without_config_dumps():
        default_setup(cfg, args)
    # default_setup configures Detectron2's and fvcore's loggers; afigan's own INFO lines (weights
    # loaded, legacy switches, stage progress) need theirs.
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="afigan", abbrev_name="afigan", color=sys.stdout.isatty()
    )
    if not sys.stdout.isatty():
        _plain_console("detectron2", "fvcore")
    quiet_user_error_tracebacks()
    changed = config_changes(cfg)
    logger.info(
        "Config: %d keys differ from the defaults (the full config is %s):\n%s",
        len(changed),
        os.path.join(cfg.OUTPUT_DIR, "config.yaml"),
        "\n".join(f"  {k}: {v!r}" for k, v in changed),
    )
    return cfg


def _drop_fx_tracing_note(record: logging.LogRecord) -> bool:
    return "is_fx_tracing will return true" not in record.getMessage()


def quiet_third_party() -> None:
    """Filter the third-party warnings of every training run that a user cannot act on (each
    narrowly, by its message; tests/conftest.py filters the same ones in the test suite)."""
    import warnings

    # Detectron2's anchor_generator.py calls torch.meshgrid without indexing= (torch asks for it).
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    # torch logs this note (once per process) when Detectron2's code asks torch.fx whether it is tracing.
    fx = logging.getLogger("torch.fx._symbolic_trace")
    if _drop_fx_tracing_note not in fx.filters:
        fx.addFilter(_drop_fx_tracing_note)
    # Detectron2's default_setup collects the environment, importing torch.utils.cpp_extension, which
    # logs that a CPU-only machine has no CUDA runtime.
    ext = logging.getLogger("torch.utils.cpp_extension")
    if _drop_no_cuda_note not in ext.filters:
        ext.addFilter(_drop_no_cuda_note)


def _drop_no_cuda_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def _drop_user_error_tracebacks(record: logging.LogRecord) -> bool:
    # Detectron2's training loop logs every exception with its traceback ("Exception during
    # training:") before re-raising it; for a user error the entry point prints one sentence.
    exc = record.exc_info[1] if record.exc_info else None
    return debug_enabled() or not isinstance(exc, USER_ERRORS)


def quiet_user_error_tracebacks() -> None:
    """Keep Detectron2's training loop from logging a traceback for a user error (see
    :data:`USER_ERRORS`); ``AFIGAN_DEBUG=1`` keeps it."""
    log = logging.getLogger("detectron2.engine.train_loop")
    if _drop_user_error_tracebacks not in log.filters:
        log.addFilter(_drop_user_error_tracebacks)


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
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
                sys.stdout,
                sys.stderr,
            ):
                handler.setFormatter(plain)


def require_file(path: str, key: str) -> str:
    """Return ``path`` if it is an existing file, else raise one sentence naming the config key."""
    if not path:
        raise ValueError(f"{key} is empty; set it to the path of the checkpoint this stage starts from.")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key}: file {path!r} does not exist; give the path of an existing checkpoint "
            f"(.pth or .pkl) or fix the path."
        )
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


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has bfloat16 convolution kernels (oneDNN: AVX-512 BF16 or AMX); without
    them bfloat16 autocast runs, but slower than float32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class AMPPolicy:
    """Whether and how to run mixed precision (``SOLVER.AMP.ENABLED``): on CUDA in
    ``SOLVER.AMP.PRECISION`` (float16 with gradient scaling, or bfloat16); on a CPU in bfloat16
    where the CPU has bfloat16 kernels, float32 with a warning otherwise. Only the networks'
    forward passes run under autocast; every loss is computed in float32."""

    def __init__(self, cfg, device: torch.device):
        precision = cfg.SOLVER.AMP.get("PRECISION", "float16")
        if precision not in ("float16", "bfloat16"):
            raise ValueError(f"SOLVER.AMP.PRECISION must be 'float16' or 'bfloat16', got {precision!r}.")
        wanted = bool(cfg.SOLVER.AMP.ENABLED)
        self.device_type = device.type
        if device.type == "cuda":
            self.enabled = wanted
            self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
        else:
            self.enabled = wanted and device.type == "cpu" and cpu_supports_bfloat16()
            self.dtype = torch.bfloat16  # float16 autocast on a CPU has no fast kernels
            if wanted and not self.enabled:
                logger.warning(
                    "SOLVER.AMP.ENABLED is ignored on %s: it has no bfloat16 convolution kernels; training in float32.",
                    device,
                )
            elif wanted and precision == "float16":
                logger.info("SOLVER.AMP on a CPU runs in bfloat16 (SOLVER.AMP.PRECISION float16 applies to CUDA).")

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self):
        """A new ``GradScaler`` for float16 on CUDA, else None (no scaling needed)."""
        return torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None


def float32_losses(losses):
    """``{name: loss}`` with every loss in float32 (a loss computed under autocast may be bfloat16)."""
    return {k: v.float() for k, v in losses.items()}


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
