"""Pseudo-labels for self-training (the ◊ rows of the README's results table): a trained detector
run over unlabeled images, its detections written as a COCO annotation file
(``tools/pseudo_label.py``).

The file has ``images`` (``id``, ``file_name`` relative to the image root, ``height``, ``width``),
``annotations`` (``bbox`` XYWH, ``area``, ``iscrowd`` 0, ``category_id`` in the training set's own
COCO ids, ``score``, and ``segmentation`` as RLE when the model predicts masks; only detections
with score >= the threshold, and for mask models only those whose mask is not empty) and the
``categories`` of the training set (``DATASETS.TRAIN[0]``). Its ``info`` records the image root
and that training set under :data:`afigan.data.datasets.PSEUDO_INFO_KEY`, so a config can train
on it by naming ``pseudo:<file>`` in ``DATASETS.TRAIN`` next to the labeled set.

Images: folders (their image files), files, glob patterns, or the name of a registered data set
(its images and ids, e.g. the toy set's ``afigan_toy_unlabeled``). Image ids otherwise: from a
COCO image-info file (``--image-info``; found by itself for COCO's layout,
``<root>/unlabeled2017`` with ``<root>/annotations/image_info_unlabeled2017.json``, and the toy
set's ``unlabeled``), else the file names' numbers when every name is a distinct number (COCO's
naming), else the 1-based position in the list of inputs.

Image reading, the model, the score thresholds of every detector kind and the category mapping
are :mod:`afigan.analysis.predict`'s (``tools/demo.py``).
"""

import argparse
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tqdm
from detectron2.data import DatasetCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from pycocotools import mask as mask_utils

from afigan.data.datasets import PSEUDO_INFO_KEY, PSEUDO_PREFIX
from afigan.io import atomic_write_json

from .predict import (
    DatasetIndex,
    Predictor,
    class_metadata,
    expand_inputs,
    readable_predictions,
    setup_predict_cfg,
    split_overrides,
)

__all__ = [
    "head_threshold",
    "resolve_images",
    "find_image_info",
    "assign_image_ids",
    "training_categories",
    "pseudo_label_images",
    "pseudo_label_parser",
    "pseudo_label_main",
]

logger = logging.getLogger(__name__)


def head_threshold(score_threshold: float) -> float:
    """The heads' test threshold that keeps every score >= ``score_threshold``: Detectron2's heads
    keep scores strictly above theirs, so the float32 just below (scores are float32)."""
    if score_threshold <= 0:
        return score_threshold
    return float(np.nextafter(np.float32(score_threshold), np.float32(-np.inf)))


def resolve_images(entries: Sequence[str]):
    """``(files, {file: image id} or None, entries that name nothing)``: a registered data set's
    images with their ids, else :func:`afigan.analysis.predict.expand_inputs` (ids assigned
    later). A data set and files cannot be mixed (their ids could collide)."""
    names = [e for e in entries if not os.path.exists(e) and e in DatasetCatalog.list()]
    if names and len(names) != len(entries):
        raise ValueError(
            f"--images mixes the data set {names[0]!r} with files or folders; give either data sets or "
            f"image files, so that the image ids cannot collide."
        )
    if not names:
        paths, unmatched = expand_inputs(entries)
        return paths, None, unmatched
    ids: Dict[str, int] = {}
    for name in names:
        for d in DatasetCatalog.get(name):
            ids.setdefault(d["file_name"], d["image_id"])
    return list(ids), ids, []


def find_image_info(paths: Sequence[str]) -> Optional[str]:
    """COCO's image-info file of ``paths`` when they all lie in one folder ``D`` next to
    ``annotations/image_info_<D's name>.json`` (``unlabeled2017``, the toy set's ``unlabeled``)."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    info = os.path.join(os.path.dirname(folder), "annotations", f"image_info_{os.path.basename(folder)}.json")
    return info if os.path.isfile(info) else None


def assign_image_ids(paths: Sequence[str], image_info: Optional[str] = None) -> Dict[str, int]:
    """``{path: image id}`` (see the module docstring). A file missing from ``image_info`` is one
    sentence naming both."""
    if image_info:
        with open(image_info) as f:
            by_name = {os.path.basename(im["file_name"]): im["id"] for im in json.load(f).get("images", [])}
        missing = [p for p in paths if os.path.basename(p) not in by_name]
        if missing:
            raise ValueError(
                f"--image-info {image_info!r} lists no image named {os.path.basename(missing[0])!r} "
                f"({len(missing)} of the {len(paths)} inputs are missing there); give the matching image-info "
                f"file, or none to number the images."
            )
        return {p: by_name[os.path.basename(p)] for p in paths}
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(s) for p, s in zip(paths, stems)}
    return {p: i + 1 for i, p in enumerate(paths)}


def training_categories(cfg, meta) -> List[Dict]:
    """The COCO ``categories`` of the training set: its JSON's when the metadata names the file,
    else built from ``thing_classes`` and the id mapping (contiguous index + 1 without one)."""
    json_file = meta.get("json_file", None)
    if json_file and os.path.isfile(json_file):
        with open(json_file) as f:
            cats = json.load(f).get("categories")
        if cats:
            return sorted(cats, key=lambda c: c["id"])
    classes = meta.get("thing_classes", None)
    if not classes:
        raise ValueError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} gives no class names (thing_classes); the "
            "pseudo-labels need the training set's categories: name the labeled set in DATASETS.TRAIN."
        )
    to_dataset_id = {v: k for k, v in meta.get("thing_dataset_id_to_contiguous_id", {}).items()}
    return [{"id": to_dataset_id.get(i, i + 1), "name": name} for i, name in enumerate(classes)]


def _image_root(paths: Sequence[str]) -> str:
    dirs = [os.path.dirname(p) or "." for p in paths]
    if all(os.path.isabs(d) for d in dirs) or not any(os.path.isabs(d) for d in dirs):
        return (os.path.commonpath(dirs) or ".") if len(set(dirs)) > 1 else dirs[0]
    return os.path.commonpath([os.path.abspath(d) for d in dirs])


def pseudo_label_images(
    cfg,
    paths: Sequence[str],
    output: str,
    score_threshold: float,
    image_info: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
    ids: Optional[Dict[str, int]] = None,
) -> Dict:
    """Run ``cfg``'s model (``MODEL.WEIGHTS``) over ``paths`` and write the pseudo-label file
    ``output`` (see the module docstring); ``ids``: the image ids (default: from ``image_info``,
    found or given, else the file names). An unreadable file gets one line (``log``) and is left
    out. Returns ``{"output", "images", "annotations", "unreadable", "image_root"}``."""
    log = log or (lambda msg: tqdm.tqdm.write(msg, file=sys.stderr))
    if not paths:
        raise ValueError("--images matches no image file; give a folder, files or a glob such as 'dir/*.jpg'.")
    if ids is None:
        image_info = image_info or find_image_info(paths)
        ids = assign_image_ids(paths, image_info)
    root = _image_root(paths)
    predictor = Predictor(cfg)
    meta = class_metadata(cfg, DatasetIndex(cfg, []))
    to_dataset_id = {v: k for k, v in meta.get("thing_dataset_id_to_contiguous_id", {}).items()}
    categories = training_categories(cfg, meta)
    images, annotations, unreadable = [], [], []
    for _, path, rgb, instances in readable_predictions(
        predictor, paths, score_threshold, unreadable, log, "pseudo-labels"
    ):
        image_id = ids[path]
        images.append(
            {
                "id": image_id,
                "file_name": os.path.relpath(path, root),
                "height": int(rgb.shape[0]),
                "width": int(rgb.shape[1]),
            }
        )
        for r in instances_to_coco_json(instances, image_id):
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": to_dataset_id.get(r["category_id"], r["category_id"]),
                "bbox": [float(v) for v in r["bbox"]],
                "iscrowd": 0,
                "score": float(r["score"]),
            }
            if "segmentation" in r:
                area = float(mask_utils.area(r["segmentation"]))
                if area <= 0:
                    continue  # an empty mask teaches the mask head nothing
                ann["segmentation"] = r["segmentation"]
            else:
                area = float(np.prod(r["bbox"][2:]))
            ann["area"] = area
            annotations.append(ann)
    if not images:
        raise ValueError(f"none of the {len(paths)} --images files could be read as an image.")
    coco = {
        "info": {
            "description": "afigan pseudo-labels (tools/pseudo_label.py)",
            PSEUDO_INFO_KEY: {
                "image_root": root,
                "like": (list(cfg.DATASETS.TRAIN) or [""])[0],
                "weights": cfg.MODEL.WEIGHTS,
                "score_threshold": score_threshold,
                "image_info": image_info or "",
            },
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_json(output, coco)  # a kill mid-write leaves no truncated file under the final name
    return {
        "output": output,
        "images": len(images),
        "annotations": len(annotations),
        "unreadable": unreadable,
        "image_root": root,
    }


def pseudo_label_parser(description: str = __doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="the trained detector's YAML config")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR_OR_GLOB",
        help="unlabeled images: folders (their image files), files, glob patterns such as 'dir/*.jpg', or a "
        "registered data set (e.g. afigan_toy_unlabeled)",
    )
    p.add_argument("--output", required=True, metavar="JSON", help="the pseudo-label file to write (COCO format)")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="keep detections with score >= this (default 0.5), set for every detector kind",
    )
    p.add_argument(
        "--image-info",
        default="",
        metavar="JSON",
        help="COCO image-info file giving the image ids (default: found next to COCO's unlabeled2017)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, last on the line, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return p


def pseudo_label_main(argv=None, description: str = __doc__) -> Dict:
    """``tools/pseudo_label.py``: parse ``argv``, pseudo-label, print where the file went and how
    to train on it."""
    args = pseudo_label_parser(description).parse_args(argv)
    images, opts = split_overrides(args.images, list(args.opts))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = setup_predict_cfg(args.config_file, opts, head_threshold(args.score_threshold))
    paths, ids, unmatched = resolve_images(images)
    for entry in unmatched:
        print(f"pseudo_label: --images {entry!r} matches no image file; going on with the others.", file=sys.stderr)
    result = pseudo_label_images(cfg, paths, args.output, args.score_threshold, args.image_info or None, ids=ids)
    print(
        f"pseudo_label: {result['annotations']} pseudo-label(s) with score >= {args.score_threshold} on "
        f"{result['images']} image(s) written to {result['output']}"
        + (f"; {len(result['unreadable'])} unreadable file(s) skipped" if result["unreadable"] else "")
        + f". Train on them with DATASETS.TRAIN naming {PSEUDO_PREFIX}{result['output']} next to the labeled set."
    )
    return result
