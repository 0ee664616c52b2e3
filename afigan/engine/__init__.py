"""Trainers of the AFI-GAN stages, the stage table and the pipeline that chains them (needs Detectron2)."""

from .detector import DetectorTrainer
from .setup import setup_cfg
from .stage1 import Stage1Trainer
from .stage2 import Stage2Trainer
from .stages import STAGES

__all__ = ["setup_cfg", "DetectorTrainer", "Stage1Trainer", "Stage2Trainer", "STAGES"]
