"""Helpers for the tests that need Detectron2 (import only after pytest.importorskip)."""

import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def make_cfg(config_file=None, *overrides, root=CONFIGS):
    """The test suite's one config helper: ``afigan.config.load_config`` (get_cfg() + add_afigan_config,
    readable errors) of ``config_file`` (relative to ``root``, configs/ by default, or absolute) with
    ``MODEL.DEVICE cpu`` and the ``KEY VALUE`` ``overrides`` after it. Not frozen."""
    from afigan.config import load_config

    path = config_file and os.path.join(root, config_file)  # join keeps an absolute config_file as it is
    return load_config(path, ["MODEL.DEVICE", "cpu", *overrides])


def toy_batch(sizes=((131, 197), (160, 160)), num_classes=3, seed=0):
    """Detectron2 training inputs: random uint8 images of the given (H, W) with two boxes each."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [w / 2, h / 2, w - 5.0, h - 3.0]]))
        inst.gt_classes = torch.tensor([0, num_classes - 1])
        from detectron2.structures import PolygonMasks

        inst.gt_masks = PolygonMasks([[[10, 12, 60, 12, 60, 70, 10, 70]], [[w / 2, h / 2, w - 5, h / 2, w - 5, h - 3]]])
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": img, "instances": inst, "height": h, "width": w})
    return batch
