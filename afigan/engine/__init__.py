"""Trainers of the three AFI-GAN stages and the pipeline that chains them (needs Detectron2)."""
from .common import setup_cfg
from .stage1 import Stage1Trainer
from .stage2 import Stage2Trainer
from .stage3 import Stage3Trainer

__all__ = ["setup_cfg", "Stage1Trainer", "Stage2Trainer", "Stage3Trainer"]
