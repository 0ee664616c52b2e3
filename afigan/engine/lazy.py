"""Training and evaluating LazyConfig (``.py``) configs: the functions behind
``tools/lazy_train_net.py``.

The same contract as Detectron2's ``tools/lazyconfig_train_net.py`` (which a pip-installed
Detectron2 does not ship): a config with ``model``, ``dataloader.{train,test,evaluator}``,
``optimizer``, ``lr_multiplier`` and ``train.{output_dir, init_checkpoint, max_iter, amp.enabled,
ddp, checkpointer, eval_period, log_period, device}``, overridden by trailing ``key=value``
pairs. Unlike it, multi-process CPU runs work, AMP is ignored where it cannot run, checkpoints
are written atomically, and ``train.seed`` (default 0) seeds every iteration.
"""

import logging
import os

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer
from afigan.config import device_fallback

from .hooks import FinalCheckpointer, SeedEachIteration
from .parallel import ddp

__all__ = ["load_lazy_config", "lazy_test", "lazy_train", "lazy_main"]

logger = logging.getLogger("afigan")


def load_lazy_config(config_file: str, overrides=()):
    """``LazyConfig.load`` + ``apply_overrides``, with one sentence for a missing file. A LazyConfig
    is another config system than the yacs one of :func:`afigan.config.load_config` (a Python
    file, ``key=value`` overrides, no defaults tree to check keys against), so it keeps this loader;
    the CUDA fallback is the shared :func:`afigan.config.device_fallback` on ``train.device``."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist.")
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    device_fallback(cfg, "running", key="train.device")
    if cfg.train.get("amp", {}).get("enabled", False) and not cfg.train.device.startswith("cuda"):
        logger.warning("train.amp.enabled is ignored on %s; training in float32.", cfg.train.device)
        cfg.train.amp.enabled = False
    return cfg


def lazy_test(cfg, model):
    """COCO (or the config's) evaluation of ``model`` on ``dataloader.test``; {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def lazy_train(cfg, resume: bool = False):
    """Train ``cfg.train.max_iter`` iterations; returns the final evaluation results ({} when
    ``train.eval_period`` is 0)."""
    model = instantiate(cfg.model).to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = ddp(model)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = AFICheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def test_and_keep():
        results.clear()
        results.update(lazy_test(cfg, model))
        return results

    keep = cfg.train.checkpointer.get("max_to_keep", None)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            SeedEachIteration(cfg.train.get("seed", 0)),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            FinalCheckpointer(
                checkpointer, cfg.train.checkpointer.period, max_iter=cfg.train.max_iter, max_to_keep=keep
            )
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, test_and_keep),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(results)


def lazy_main(args):
    """``tools/lazy_train_net.py``: train, or with ``--eval-only`` evaluate ``train.init_checkpoint``."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = ddp(instantiate(cfg.model).to(cfg.train.device))
        if not cfg.train.init_checkpoint:
            raise ValueError("--eval-only needs train.init_checkpoint=<checkpoint to evaluate> on the command line.")
        AFICheckpointer(model).load(cfg.train.init_checkpoint)
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=args.resume)
