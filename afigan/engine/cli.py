"""The functions behind ``tools/*.py`` (kept here so tests reach them): one per entry point,
each taking Detectron2's parsed ``default_argument_parser`` arguments and run under ``launch``."""
import argparse
import functools
import logging

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer

from .common import setup_cfg
from .lazy import lazy_main
from .detector import DetectorTrainer
from .inputs import check_inputs
from .stages import STAGES

__all__ = ["train_stage", "eval_only", "stage_main", "tool_parser", "launch_stage", "launch_lazy"]

logger = logging.getLogger("afigan")


def train_stage(stage: str, args):
    """Train one stage of :data:`afigan.engine.stages.STAGES` ("stage0" = the NN teacher,
    "stage1", "stage2", "stage3"); returns the final evaluation results (empty for stages 1-2)."""
    cfg = setup_cfg(args, stage=stage)
    check_inputs(cfg, STAGES[stage].required, test=STAGES[stage].evaluates)
    trainer = STAGES[stage].trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer keeps the final evaluation (run by its EvalHook) here.
    return dict(getattr(trainer, "_last_eval_results", None) or {})


def eval_only(args):
    """Build the model of ``--config-file``, load ``MODEL.WEIGHTS`` and run COCO evaluation."""
    cfg = setup_cfg(args, stage="eval")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to evaluate, e.g. MODEL.WEIGHTS output/stage3/model_final.pth.")
    check_inputs(cfg, train=False)  # MODEL.WEIGHTS is set (above); check that it and every other file exist
    model = DetectorTrainer.build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model: %s parameters (%s trainable).", f"{total:,}", f"{trainable:,}")
    AFICheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    return DetectorTrainer.evaluate(cfg, model)


def stage_main(stage: str, args):
    """``tools/stage{N}_train.py`` and ``tools/run_net.py`` (= stage 3): train the stage, or with
    ``--eval-only`` evaluate ``MODEL.WEIGHTS`` where the stage has an evaluation; stages 1-2
    refuse it with one sentence."""
    if args.eval_only:
        if not STAGES[stage].evaluates:
            raise ValueError(f"--eval-only: {stage} trains {STAGES[stage].description}, which has no detection "
                             f"evaluation; evaluate a detector with tools/run_net.py --eval-only.")
        res = eval_only(args)
    else:
        res = train_stage(stage, args)
    return res if comm.is_main_process() else None


def tool_parser(description: str, hide=()) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` (``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing overrides)
    whose help starts with the tool's own ``description`` and leaves out the flags in ``hide``
    (flags the tool does not honour)."""
    parser = default_argument_parser()
    parser.description, parser.epilog = description, None
    for action in parser._actions:  # argparse has no public way to hide an inherited flag
        if set(action.option_strings) & set(hide):
            action.help = argparse.SUPPRESS
    return parser


def _launch(main, args):
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


def launch_stage(stage: str, description: str, argv=None):
    """A stage script's ``__main__``: :func:`tool_parser`, then :func:`stage_main` under
    Detectron2's ``launch``. Stages without an evaluation do not list ``--eval-only``."""
    hide = () if STAGES[stage].evaluates else ("--eval-only",)
    args = tool_parser(description, hide).parse_args(argv)
    return _launch(functools.partial(stage_main, stage), args)


def launch_lazy(description: str, argv=None):
    """``tools/lazy_train_net.py``'s ``__main__``: :func:`afigan.engine.lazy.lazy_main` under ``launch``."""
    return _launch(lazy_main, tool_parser(description).parse_args(argv))
