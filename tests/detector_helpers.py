"""Shared by the detector tests (FCOS, CenterMask, configs): toy batches, one step (configs: d2_helpers.make_cfg)."""

import os
from typing import Dict, List

import torch
from d2_helpers import CONFIGS, REPO

ROOT = REPO  # the repository root
DETECTORS = os.path.join(CONFIGS, "detectors")
TOY = os.path.join(CONFIGS, "toy", "detectors")


def toy_dicts(root: str, split: str = "train") -> List[Dict]:
    """Detectron2 dicts of a small toy set made under ``root`` (made once)."""
    from detectron2.data.datasets import load_coco_json

    from afigan.data.toy_shapes import ensure_toy_dataset, toy_paths

    ensure_toy_dataset(root, num_train=4, num_val=2, seed=1)
    return load_coco_json(*toy_paths(root, split), f"toy_{split}_{abs(hash(root))}")


def mapped(cfg, dicts: List[Dict], is_train: bool, seed: int = 0) -> List[Dict]:
    """``dicts`` through Detectron2's DatasetMapper (resize, flip, Instances with polygon masks).

    The random sizes and flips come from numpy's global generator, seeded here with ``seed`` (and
    restored afterwards) so that every run of a test sees the same batch."""
    import numpy as np
    from detectron2.data import DatasetMapper

    mapper = DatasetMapper(cfg, is_train=is_train)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return [mapper(dict(d)) for d in dicts]
    finally:
        np.random.set_state(state)


def train_step(model, batch: List[Dict]) -> Dict[str, torch.Tensor]:
    """One training forward + backward; returns the loss dict."""
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    return losses


def synthetic_input(height: int, width: int, boxes, classes, with_masks: bool = True) -> Dict:
    """A model input dict with a random image and the given XYXY boxes (and box-shaped polygon masks)."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    inst = Instances((height, width))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if with_masks:
        inst.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes])
    image = torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(height * width)).float()
    return {"image": image, "instances": inst, "height": height, "width": width}


def one_thread():
    """Generator for an autouse fixture: run on one intra-op thread, then restore. The tests run on
    a shared 2-core machine, where two threads per process oversubscribe it several times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
