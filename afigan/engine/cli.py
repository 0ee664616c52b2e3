"""The functions behind ``tools/*.py`` (kept here so tests reach them): one per entry point,
each taking Detectron2's parsed ``default_argument_parser`` arguments and run under ``launch``."""
import functools
import logging

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer

from .common import setup_cfg
from .detector import DetectorTrainer
from .stages import STAGES

__all__ = ["train_stage", "eval_only", "stage_main", "launch_stage"]

logger = logging.getLogger("afigan")


def train_stage(stage: str, args):
    """Train one stage of :data:`afigan.engine.stages.STAGES` ("stage0" = the NN teacher,
    "stage1", "stage2", "stage3"); returns the final evaluation results (empty for stages 1-2)."""
    cfg = setup_cfg(args, stage=stage)
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


def launch_stage(stage: str, argv=None):
    """A stage script's ``__main__``: Detectron2's argument parser, then :func:`stage_main` under
    ``launch`` (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``)."""
    args = default_argument_parser().parse_args(argv)
    return launch(functools.partial(stage_main, stage), args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
