"""The functions behind ``tools/*.py`` (kept here so tests reach them): one per entry point,
each taking Detectron2's parsed ``default_argument_parser`` arguments and run under ``launch``."""
import logging

from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer

from .common import setup_cfg
from .stage1 import Stage1Trainer
from .stage2 import Stage2Trainer
from .stage3 import Stage3Trainer

__all__ = ["TRAINERS", "train_stage", "eval_only", "run_net"]

TRAINERS = {"stage0": Stage3Trainer, "stage1": Stage1Trainer, "stage2": Stage2Trainer, "stage3": Stage3Trainer}
logger = logging.getLogger("afigan")


def train_stage(stage: str, args):
    """Train one stage ("stage0" = the NN teacher, "stage1", "stage2", "stage3"); returns the
    stage-3/stage-0 evaluation results (empty dict for stages 1-2)."""
    cfg = setup_cfg(args, stage=stage)
    trainer = TRAINERS[stage](cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer keeps the final evaluation (run by its EvalHook) here.
    return dict(getattr(trainer, "_last_eval_results", None) or {})


def eval_only(args):
    """Build the model of ``--config-file``, load ``MODEL.WEIGHTS`` and run COCO evaluation."""
    cfg = setup_cfg(args, stage="eval")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to evaluate, e.g. MODEL.WEIGHTS output/stage3/model_final.pth.")
    model = Stage3Trainer.build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model: %s parameters (%s trainable).", f"{total:,}", f"{trainable:,}")
    AFICheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    return Stage3Trainer.evaluate(cfg, model)


def run_net(args):
    """``--eval-only``: evaluate; otherwise train a detector as stage 3 does (Detectron2's train_net)."""
    if args.eval_only:
        res = eval_only(args)
    else:
        res = train_stage("stage3", args)
    if comm.is_main_process():
        return res
    return None
