"""Detectron2 catalog entries for the toy data set (``afigan_toy_train`` / ``afigan_toy_val``).

The root is ``$AFIGAN_DATASETS/afigan_toy``, else ``$DETECTRON2_DATASETS/afigan_toy``, else
``./datasets/afigan_toy``. The loader makes the set on first use when it is missing, so a toy
config trains without a separate preparation step.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .toy_shapes import TOY_CATEGORIES, ensure_toy_dataset, toy_paths

__all__ = ["TOY_DATASETS", "toy_root", "register_toy_dataset"]

TOY_DATASETS = ("afigan_toy_train", "afigan_toy_val")


def toy_root() -> str:
    base = os.environ.get("AFIGAN_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    return os.path.join(base, "afigan_toy")


def register_toy_dataset(root: str = None, prefix: str = "afigan_toy") -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` (COCO instances with polygon masks).

    ``root`` defaults to :func:`toy_root` evaluated when the data is first loaded, so setting
    ``AFIGAN_DATASETS`` after import still takes effect. Registering a name twice is a no-op.
    """
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue

        def load(split=split, name=name):
            r = ensure_toy_dataset(root or toy_root())
            json_file, image_root = toy_paths(r, split)
            meta = MetadataCatalog.get(name)
            # Paths are fixed at first load (the evaluator reads json_file).
            if not hasattr(meta, "json_file"):
                meta.set(json_file=json_file, image_root=image_root)
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        meta = {"thing_classes": [c["name"] for c in TOY_CATEGORIES], "evaluator_type": "coco"}
        if root is not None:
            meta.update(zip(("json_file", "image_root"), toy_paths(root, split)))
        MetadataCatalog.get(name).set(**meta)


register_toy_dataset()
