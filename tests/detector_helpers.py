"""Shared by the detector tests (FCOS, CenterMask, configs): config loading, toy batches, one step."""

import os
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTORS = os.path.join(ROOT, "configs", "detectors")
TOY = os.path.join(ROOT, "configs", "toy", "detectors")


def load_cfg(path: str, *opts):
    """afigan cfg from ``path`` (relative to the repo root or absolute), on CPU, with KEY VALUE ``opts``."""
    from detectron2.config import get_cfg

    from afigan import add_afigan_config

    cfg = add_afigan_config(get_cfg())
    cfg.merge_from_file(path if os.path.isabs(path) else os.path.join(ROOT, path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(opts))
    return cfg


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


def build_or_skip(cfg):
    """``build_model(cfg)``, skipping the test when the config's backbone builder belongs to a
    module that is not in this checkout (BiFPN, ResNeSt and Swin come from other issues)."""
    import pytest
    from detectron2.modeling import BACKBONE_REGISTRY, build_model

    if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
        pytest.skip(f"backbone builder {cfg.MODEL.BACKBONE.NAME} is not registered in this checkout")
    return build_model(cfg)
