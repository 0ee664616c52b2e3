"""Detectron2 catalog entries for the toy data set (``afigan_toy_train`` / ``afigan_toy_val``, and
``afigan_toy_unlabeled``: images without annotations), and for pseudo-labeled data sets
(:func:`register_pseudo_labels`; a name ``pseudo:<file.json>`` registers the file that
``tools/pseudo_label.py`` wrote when a config names it).

The root is ``$AFIGAN_DATASETS/afigan_toy``, else ``$DETECTRON2_DATASETS/afigan_toy``, else
``./datasets/afigan_toy``. The loader makes the set on first use when it is missing, so a toy
config trains without a separate preparation step.
"""

import json
import os
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .toy_shapes import TOY_CATEGORIES, ensure_toy_dataset, ensure_toy_unlabeled, toy_paths, toy_unlabeled_paths

__all__ = [
    "TOY_DATASETS",
    "toy_root",
    "register_toy_dataset",
    "register_pseudo_labels",
    "PSEUDO_PREFIX",
    "PSEUDO_INFO_KEY",
    "register_pseudo_names",
]

TOY_DATASETS = ("afigan_toy_train", "afigan_toy_val", "afigan_toy_unlabeled")
# A data-set name "pseudo:<path>" stands for the pseudo-label file at <path> (see register_pseudo_names).
PSEUDO_PREFIX = "pseudo:"
# The key under the pseudo-label file's "info" that records its image root and labeled set.
PSEUDO_INFO_KEY = "afigan_pseudo_labels"


def toy_root() -> str:
    base = os.environ.get("AFIGAN_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    return os.path.join(base, "afigan_toy")


def register_toy_dataset(root: str = None, prefix: str = "afigan_toy") -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` (COCO instances with polygon masks) and
    ``{prefix}_unlabeled`` (images only, for pseudo-labelling).

    ``root`` defaults to :func:`toy_root` evaluated when the data is first loaded, so setting
    ``AFIGAN_DATASETS`` after import still takes effect. Registering a name twice is a no-op.
    """
    # Per split: (make the files if missing, their (json_file, image_root)); the unlabeled split's
    # JSON is an image-info file (images, categories, no annotations), as COCO's unlabeled2017.
    splits = {
        "train": (ensure_toy_dataset, lambda r: toy_paths(r, "train")),
        "val": (ensure_toy_dataset, lambda r: toy_paths(r, "val")),
        "unlabeled": (ensure_toy_unlabeled, toy_unlabeled_paths),
    }
    for split, (ensure, paths) in splits.items():
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue

        def load(ensure=ensure, paths=paths, name=name):
            json_file, image_root = paths(ensure(root or toy_root()))
            meta = MetadataCatalog.get(name)
            # Paths are fixed at first load (the evaluator reads json_file).
            if not hasattr(meta, "json_file"):
                meta.set(json_file=json_file, image_root=image_root)
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        meta = {"thing_classes": [c["name"] for c in TOY_CATEGORIES], "evaluator_type": "coco"}
        if root is not None:
            meta.update(zip(("json_file", "image_root"), paths(root)))
        MetadataCatalog.get(name).set(**meta)


def register_pseudo_labels(name: str, json_file: str, image_root: str, like: str = "") -> None:
    """Register the COCO-format pseudo-label file ``json_file`` (images under ``image_root``) as
    data set ``name``, with the metadata of the labeled data set ``like`` (its classes, evaluator
    type, category-id mapping) so that ``DATASETS.TRAIN`` can name both. A name registered before
    is left as it is."""
    if name in DatasetCatalog.list():
        return
    meta = {}
    if like:
        if like not in DatasetCatalog.list():
            raise KeyError(
                f"register_pseudo_labels: the labeled data set {like!r} whose metadata {name!r} copies is "
                f'not registered; register it first or pass like="".'
            )
        meta = {
            k: v for k, v in MetadataCatalog.get(like).as_dict().items() if k not in ("name", "json_file", "image_root")
        }
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(**meta, json_file=json_file, image_root=image_root)


def register_pseudo_names(names: Sequence[str], key: str = "DATASETS.TRAIN") -> None:
    """Register every name ``pseudo:<path>`` of ``names`` (a file that ``tools/pseudo_label.py``
    wrote: its ``info`` records the image root and the labeled data set whose metadata it shares).
    Other names are left to the catalog."""
    for name in names:
        if not name.startswith(PSEUDO_PREFIX) or name in DatasetCatalog.list():
            continue
        path = name[len(PSEUDO_PREFIX) :]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{key}: the pseudo-label file {path!r} of data set {name!r} does not exist; write it "
                f"with tools/pseudo_label.py --output {path} (see README, self-training)."
            )
        try:
            with open(path) as f:
                info = json.load(f).get("info", {}).get(PSEUDO_INFO_KEY)
        except (ValueError, AttributeError):
            info = None
        if not isinstance(info, dict) or "image_root" not in info:
            raise ValueError(
                f"{key}: {path!r} of data set {name!r} is not a pseudo-label file of tools/pseudo_label.py "
                f"(its info lacks {PSEUDO_INFO_KEY!r}); regenerate it, or register it with "
                f"afigan.data.datasets.register_pseudo_labels under a name of your own."
            )
        register_pseudo_labels(
            name,
            path,
            info["image_root"],
            info.get("like", "") if info.get("like", "") in DatasetCatalog.list() else "",
        )


register_toy_dataset()
