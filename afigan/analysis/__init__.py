"""Diagnostics of trained backbones (``tools/analyze_filters.py``).

``filters`` (pure PyTorch): weight statistics and the high-frequency share of conv kernels;
``features``: edge/blur response of stage outputs on images; ``report``: tables, verdicts, plots
(the model-loading parts import Detectron2 when called).
"""

from .features import spectral_energies, stage_responses
from .filters import (
    DEFAULT_CUT,
    kernel_hf_share,
    stage_weight_stats,
    stage_weights_from_state_dict,
    white_noise_hf_share,
)

__all__ = [k for k in dir() if not k.startswith("_")]
