"""Data: the toy data set (pure Python) and, with Detectron2, its catalog registration and the
HR/LR mapper of stages 1-2."""

from .toy_shapes import TOY_CATEGORIES, ensure_toy_dataset, make_toy_dataset, toy_dataset_ready, toy_paths

__all__ = ["TOY_CATEGORIES", "ensure_toy_dataset", "make_toy_dataset", "toy_dataset_ready", "toy_paths"]
