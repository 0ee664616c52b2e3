"""FCOS: the head (a registered proposal generator), its targets, the ``OneStageDetector``
meta-architecture that makes it a detector, and the class-count check. Importing registers them."""

from .fcos import FCOS
from .head import FCOSScaledHead
from .num_classes import check_num_classes
from .one_stage import OneStageDetector

__all__ = ["FCOS", "FCOSScaledHead", "check_num_classes", "OneStageDetector"]
