"""A synthetic COCO-format instance-segmentation data set: the package's embedded default.

Coloured squares, discs and triangles on a noisy gradient background, with polygon masks at
COCO's small / medium / large scales. Deterministic from a seed, written in a few seconds, and
used by the quick start, the tests and the benchmarks (no download needed).

    python -m afigan.data.toy OUT_DIR [--train 48 --val 16 --unlabeled 32 --seed 0]   (see afigan/data/toy.py)

writes ``OUT_DIR/{train,val}/*.png`` and ``OUT_DIR/annotations/instances_{train,val}.json``, and
an ``unlabeled`` split for self-training in COCO's ``unlabeled2017`` layout: ``OUT_DIR/unlabeled/*.png``
(the same kind of images, their shapes not annotated) listed in
``OUT_DIR/annotations/image_info_unlabeled.json`` (images and categories, no annotations).
``OUT_DIR/generator_settings.json`` records what the set was made with (image counts, seed, format
version): a caller asking for other settings gets the set made again (:func:`ensure_toy_dataset`).
This module needs only numpy and Pillow; the Detectron2 registration lives in
``afigan.data.datasets``.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from afigan.io import atomic_write_json

__all__ = [
    "TOY_CATEGORIES",
    "make_toy_dataset",
    "toy_dataset_ready",
    "toy_settings",
    "ensure_toy_dataset",
    "toy_paths",
    "ensure_toy_unlabeled",
    "toy_unlabeled_paths",
    "UNLABELED_FIRST_ID",
]

TOY_CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# Object side lengths in pixels for the three COCO size classes (area < 32^2, < 96^2, larger).
_SCALES = {"small": (10, 26), "medium": (36, 80), "large": (100, 150)}
_FORMAT_VERSION = 1  # raise it when the generator draws other images: every set is then made again
SETTINGS_FILE = "generator_settings.json"
# Image ids of the unlabeled split start here, so they never collide with the labeled splits'
# (1, 2, ...) when pseudo-labeled images and labeled ones are trained on together.
UNLABELED_FIRST_ID = 500_001
NUM_UNLABELED = 32
# make_toy_dataset's defaults: the package's toy set.
DEFAULT_SETTINGS = {"num_train": 48, "num_val": 16, "seed": 0, "num_unlabeled": NUM_UNLABELED}


def toy_paths(root: str, split: str) -> Tuple[str, str]:
    """(json_file, image_root) of a split ("train" or "val") under ``root``."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def toy_unlabeled_paths(root: str) -> Tuple[str, str]:
    """(image_info json, image folder) of the unlabeled split under ``root``, as COCO lays out
    ``annotations/image_info_unlabeled2017.json`` and ``unlabeled2017/``."""
    return os.path.join(root, "annotations", "image_info_unlabeled.json"), os.path.join(root, "unlabeled")


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> List[Tuple[float, float]]:
    r = size / 2.0
    if kind == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif kind == "disc":
        corners = [(r * math.cos(t), r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    else:
        corners = [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners]


def _area(poly: List[Tuple[float, float]]) -> float:
    xs, ys = np.array(poly).T
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _background(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base + (yy[..., None] / h) * slope[0] + (xx[..., None] / w) * slope[1]
    img += rng.normal(0, 12, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_split(
    rng: np.random.RandomState, num_images: int, image_dir: str, first_ann_id: int, first_image_id: int = 1
) -> Dict:
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id in range(first_image_id, first_image_id + num_images):
        # Sizes vary and include odd numbers, so padding and odd pyramids are exercised.
        h, w = int(rng.randint(160, 225)), int(rng.randint(192, 289))
        canvas = Image.fromarray(_background(rng, h, w))
        draw = ImageDraw.Draw(canvas)
        boxes: List[Tuple[float, float, float, float]] = []
        for _ in range(int(rng.randint(1, 5))):
            scale = ["small", "medium", "large"][rng.choice(3, p=[0.4, 0.4, 0.2])]
            lo, hi = _SCALES[scale]
            size = float(rng.uniform(lo, min(hi, min(h, w) - 4)))
            kind = TOY_CATEGORIES[rng.randint(len(TOY_CATEGORIES))]
            # Bound on the polygon's distance from its centre (+1 px margin) keeps it inside the image.
            r = (size / 2 + 1) * (math.sqrt(2) if kind["name"] == "square" else 1.0)
            if 2 * r >= min(h, w):
                continue
            for _attempt in range(30):
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                poly = _polygon(kind["name"], cx, cy, size, float(rng.uniform(0, 2 * math.pi)))
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                box = (min(xs), min(ys), max(xs), max(ys))
                if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
                    break
            else:
                continue  # no free spot for this object; the image gets one fewer
            boxes.append(box)
            colour = tuple(int(c) for c in rng.randint(0, 256, size=3))
            draw.polygon(poly, fill=colour)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": kind["id"],
                    "segmentation": [[round(v, 2) for p in poly for v in p]],
                    "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                    "area": round(_area(poly), 2),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        file_name = f"{image_id:06d}.png"
        canvas.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    return {
        "info": {"description": "afigan synthetic toy shapes", "version": _FORMAT_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": TOY_CATEGORIES,
    }


def _unlabeled_info(root: str, num_images: int, seed: int) -> Dict:
    """Draw the unlabeled split's images into ``root/unlabeled`` and return its image-info dict.
    Its own RNG stream (seeded by (seed, 2)), so the labeled splits are the same with or without it."""
    coco = _make_split(
        np.random.RandomState([seed, 2]), num_images, toy_unlabeled_paths(root)[1], 1, first_image_id=UNLABELED_FIRST_ID
    )
    del coco["annotations"]  # COCO's image_info files have none
    coco["info"] = dict(coco["info"], description="afigan synthetic toy shapes, unlabeled split", seed=seed)
    return coco


def _write_unlabeled(root: str, num_images: int, seed: int) -> None:
    os.makedirs(toy_unlabeled_paths(root)[1])
    with open(toy_unlabeled_paths(root)[0], "w") as f:
        json.dump(_unlabeled_info(root, num_images, seed), f)


def ensure_toy_unlabeled(root: str, num_images: int = NUM_UNLABELED, seed: int = 0) -> str:
    """Add the unlabeled split to the toy set at ``root`` (made first when missing) unless it is
    there; a set written before the split existed gains it without its labeled splits being
    rewritten (other processes may be reading them). Returns ``root``."""
    ensure_toy_dataset(root)
    info, image_dir = toy_unlabeled_paths(root)
    if os.path.isfile(info):
        return root
    tmp = tempfile.mkdtemp(prefix=".toy-unlabeled-", dir=root)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        _write_unlabeled(tmp, num_images, seed)
        try:
            os.replace(os.path.join(tmp, "unlabeled"), image_dir)
        except OSError:
            if not os.path.isdir(image_dir):  # else another process moved its identical copy into place
                raise
        # The info file last: its existence marks the split complete.
        os.replace(toy_unlabeled_paths(tmp)[0], info)
        recorded = toy_settings(root)
        if recorded is not None:
            _write_settings(root, dict(recorded, num_unlabeled=num_images))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_toy_dataset(
    out_dir: str, num_train: int = 48, num_val: int = 16, seed: int = 0, num_unlabeled: int = NUM_UNLABELED
) -> str:
    """Write the toy set to ``out_dir`` (replacing it) and return ``out_dir``.

    The set is built in a temporary sibling directory and renamed into place, so concurrent
    callers (e.g. several DDP ranks) and interrupted runs never leave a half-written set.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    settings = _settings(num_train=num_train, num_val=num_val, seed=seed, num_unlabeled=num_unlabeled)
    tmp = tempfile.mkdtemp(prefix=".toy-", dir=parent)
    try:
        rng = np.random.RandomState(seed)
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, n, first_id in (("train", num_train, 1), ("val", num_val, 1_000_000)):
            os.makedirs(os.path.join(tmp, split))
            coco = _make_split(rng, n, os.path.join(tmp, split), first_id)
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)
        _write_unlabeled(tmp, num_unlabeled, seed)
        _write_settings(tmp, settings)
        if toy_settings(out_dir) == settings and _splits_exist(out_dir):
            # Another process (a DDP rank) put the same set in place meanwhile: keep it, it may be read.
            shutil.rmtree(tmp, ignore_errors=True)
            return out_dir
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except FileExistsError:
        # Another process moved its identical copy into place first.
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _settings(**given) -> Dict:
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise TypeError(
            f"toy data set: unknown setting {unknown[0]!r}; the settings are {', '.join(DEFAULT_SETTINGS)}."
        )
    return dict(DEFAULT_SETTINGS, **{k: int(v) for k, v in given.items()}, format_version=_FORMAT_VERSION)


def _write_settings(root: str, settings: Dict) -> None:
    atomic_write_json(os.path.join(root, SETTINGS_FILE), settings, indent=1)


def toy_settings(root: str):
    """The settings the toy set at ``root`` was made with (None when it has no record: made by an
    older afigan, or not there)."""
    path = os.path.join(root, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _splits_exist(root: str) -> bool:
    return all(os.path.isfile(toy_paths(root, s)[0]) for s in ("train", "val"))


def toy_dataset_ready(root: str, **settings) -> bool:
    """True when both splits exist under ``root`` and the set was made by this generator version
    with ``settings`` (make_toy_dataset's arguments; the defaults fill in those not given). With no
    settings given, any set of this version counts: the one at ``root``, as it was made."""
    recorded = toy_settings(root)
    if not _splits_exist(root) or recorded is None or recorded.get("format_version") != _FORMAT_VERSION:
        return False
    return not settings or recorded == _settings(**settings)


def ensure_toy_dataset(root: str, **settings) -> str:
    """Make the toy set at ``root`` unless one made with ``settings`` (see :func:`toy_dataset_ready`)
    is there; return ``root``."""
    if not toy_dataset_ready(root, **settings):
        make_toy_dataset(root, **settings)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write (replaced if it exists)")
    parser.add_argument("--train", type=int, default=48, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--unlabeled", type=int, default=NUM_UNLABELED, help="number of unlabeled images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_toy_dataset(args.out_dir, args.train, args.val, args.seed, args.unlabeled)
    for split in ("train", "val"):
        with open(toy_paths(out, split)[0]) as f:
            coco = json.load(f)
        print(
            f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} instances -> {toy_paths(out, split)[0]}"
        )
    with open(toy_unlabeled_paths(out)[0]) as f:
        print(f"unlabeled: {len(json.load(f)['images'])} images, no annotations -> {toy_unlabeled_paths(out)[0]}")
