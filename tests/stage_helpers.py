"""Shared set-up of the stage-trainer tests (import after pytest.importorskip("detectron2"))."""

import argparse
import os

import torch
from d2_helpers import CONFIGS
from detectron2.engine import HookBase

# Smallest sizes that still exercise everything: ~100 px images, 2 per batch.
TINY = [
    "INPUT.MIN_SIZE_TRAIN",
    (96,),
    "INPUT.MAX_SIZE_TRAIN",
    128,
    "INPUT.MIN_SIZE_TEST",
    96,
    "INPUT.MAX_SIZE_TEST",
    128,
    "SOLVER.IMS_PER_BATCH",
    2,
    "SOLVER.WARMUP_ITERS",
    0,
    "SEED",
    7,
    "DATALOADER.NUM_WORKERS",
    0,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    32,
]


def stage_args(config: str, *opts, resume: bool = False, eval_only: bool = False) -> argparse.Namespace:
    """What Detectron2's default_argument_parser would give for ``--config-file config opts...``."""
    return argparse.Namespace(
        config_file=os.path.join(CONFIGS, config),
        opts=[str(o) if not isinstance(o, (tuple, list)) else o for o in opts],
        resume=resume,
        eval_only=eval_only,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


def stage_cfg(config: str, output_dir: str, *opts):
    """A stage tool's set-up of ``config`` (relative to configs/) at TINY sizes, writing to ``output_dir``:
    ``afigan.engine.setup_cfg`` as the tools run it (the same ``afigan.config.load_config`` as
    ``d2_helpers.make_cfg``, then the device fallback, the output folder, logging; frozen). Tests of a
    model or a layer that need no set-up use ``make_cfg``."""
    from afigan.engine import setup_cfg

    return setup_cfg(stage_args(config, *TINY, "OUTPUT_DIR", output_dir, *opts))


def save_teacher(path: str) -> str:
    """A randomly initialised teacher (toy stage-0 architecture) saved as a Detectron2 .pth.

    Its FPN output convs are scaled by 0.05 so the pyramid features are O(1), like a trained
    teacher's, instead of the O(50) a random BN network in eval mode produces."""
    from d2_helpers import make_cfg

    from afigan.modeling.meta_arch import build_guide_model

    torch.manual_seed(123)
    teacher = build_guide_model(make_cfg("toy/pipeline/stage1.yaml"), load_weights=False)
    state = {k: v * 0.05 if "fpn_output" in k else v for k, v in teacher.state_dict().items()}
    torch.save({"model": state}, path)
    return path


def stage1_chain(root, iters: int = 2) -> dict:
    """A random teacher under ``root`` and an ``iters``-iteration stage-1 run against it:
    ``{"root", "teacher", "G", "D"}`` (the final G_0 / D_0 checkpoints)."""
    from afigan.engine import Stage1Trainer

    teacher = save_teacher(str(root / "teacher.pth"))
    t = Stage1Trainer(
        stage_cfg(
            "toy/pipeline/stage1.yaml", str(root / "stage1"), "MODEL.GUIDE_WEIGHTS", teacher, "SOLVER.MAX_ITER", iters
        )
    )
    t.resume_or_load(resume=False)
    t.train()
    return {
        "root": root,
        "teacher": teacher,
        "G": str(root / "stage1" / "G_0" / "model_final.pth"),
        "D": str(root / "stage1" / "D_0" / "model_final.pth"),
    }


def params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StopAt(HookBase):
    """A hook that 'kills' training (KeyboardInterrupt) right after iteration ``iteration``."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt
