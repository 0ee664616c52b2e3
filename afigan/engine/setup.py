"""Preparing a training or evaluation run: the config of the command line (through
:func:`afigan.config.load_config`), the output directory, Detectron2's ``default_setup`` and the
log filters that keep a run's console readable."""

import contextlib
import logging
import os
import sys

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from afigan.config import config_changes, fallback_syncbn, load_config
from afigan.quiet import quiet_third_party

from .errors import USER_ERRORS, debug_enabled

__all__ = ["setup_cfg", "quiet_user_error_tracebacks"]

logger = logging.getLogger(__name__)


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
    """:func:`afigan.config.load_config` of Detectron2's parsed arguments (``args.config_file``,
    ``args.opts``), CPU and SyncBN fallbacks, then Detectron2's ``default_setup`` (logging, output
    dir, seeds, config dump). Frozen."""
    cfg = load_config(args.config_file, args.opts, fallback="running")
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


def _drop_user_error_tracebacks(record: logging.LogRecord) -> bool:
    # Detectron2's training loop logs every exception with its traceback ("Exception during
    # training:") before re-raising it; for a user error the entry point prints one sentence.
    exc = record.exc_info[1] if record.exc_info else None
    return debug_enabled() or not isinstance(exc, USER_ERRORS)


def quiet_user_error_tracebacks() -> None:
    """Keep Detectron2's training loop from logging a traceback for a user error (see
    :data:`afigan.engine.errors.USER_ERRORS`); ``AFIGAN_DEBUG=1`` keeps it."""
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
