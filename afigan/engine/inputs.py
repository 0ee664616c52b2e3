"""Checks of a stage's input files, run before anything is built, so a missing file stops the run
with one sentence instead of a traceback after minutes of model and data loading."""

import os

from detectron2.data import MetadataCatalog

from afigan.data.loader import check_dataset_names

from .errors import require_file

__all__ = ["WEIGHT_KEYS", "check_inputs"]

# Every config key that names a checkpoint file.
WEIGHT_KEYS = (
    "MODEL.WEIGHTS",
    "MODEL.GUIDE_WEIGHTS",
    "MODEL.AFI_GEN_WEIGHTS",
    "MODEL.AFI_DIS_WEIGHTS",
    "MODEL.AF_EXTRACTOR_WEIGHTS",
)


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_dataset_files(names, key: str) -> None:
    check_dataset_names(names, key)
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file", None)  # data sets made on first use (the toy set) have none yet
        if json_file and not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"{key}: data set {name!r} reads {json_file!r}, which does not exist; lay the data out as "
                f"datasets/README.md says (or point DETECTRON2_DATASETS at it)."
            )
        image_root = meta.get("image_root", None)
        if json_file and image_root and not os.path.isdir(image_root):
            raise FileNotFoundError(
                f"{key}: the images of data set {name!r} should be in {image_root!r}, which does not exist."
            )


def check_inputs(cfg, required=(), train: bool = True, test: bool = True) -> None:
    """Raise one sentence for the first missing input: a ``required`` weights key that is empty
    or names no file, any other weights key that names a missing file, an unregistered data set
    or a missing annotation file / image folder of ``DATASETS.TRAIN`` (when ``train``) and of
    ``DATASETS.TEST`` (when ``test``: stages that evaluate)."""
    for key in WEIGHT_KEYS:
        path = _value(cfg, key)
        if key in required or (path and "://" not in path):
            require_file(path, key)
    if train:
        _check_dataset_files(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    if test and cfg.DATASETS.TEST:
        _check_dataset_files(cfg.DATASETS.TEST, "DATASETS.TEST")
