"""The frozen teacher ("guide") of stages 1-2: a backbone+neck that only returns pyramid features.

``GUIDE_ARCH_REGISTRY`` holds teacher architectures; ``RCNN_FPN_only`` (the reference's name)
builds ``MODEL.GUIDE_BACKBONE.NAME`` (default Detectron2's nearest-neighbour FPN) with the rest
of the cfg's RESNETS / FPN / PIXEL settings. :func:`build_guide_model` loads
``MODEL.GUIDE_WEIGHTS`` (a Detectron2 zoo ``.pkl`` or any ``.pth`` whose ``backbone.*`` tensors
fit; head tensors are ignored), and returns it in eval mode with gradients off: it is never
optimised, never wrapped in DDP, and its forward runs under ``torch.no_grad()``.
"""

import logging
import os
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import build_backbone
from detectron2.structures import ImageList
from detectron2.utils.registry import Registry
from torch import nn

from afigan.checkpoint import AFICheckpointer, PartialLoad

__all__ = ["GUIDE_ARCH_REGISTRY", "RCNN_FPN_only", "build_guide_model"]

GUIDE_ARCH_REGISTRY = Registry("GUIDE_ARCH")
GUIDE_ARCH_REGISTRY.__doc__ = "Teacher (guide) architectures: cfg -> module returning a dict of pyramid features."
logger = logging.getLogger(__name__)


@GUIDE_ARCH_REGISTRY.register()
class RCNN_FPN_only(nn.Module):  # noqa: N801 - the reference's registry name
    """Backbone + neck of a detector; ``forward(batched_inputs, image_key)`` -> {"p2": (N, C, h, w), ...}.

    Images are read from ``batched_inputs[i][image_key]`` (uint8 C x H x W), normalised with the
    pixel statistics (buffers, so ``.to(device)`` moves them) and padded to the neck's
    ``size_divisibility`` like Detectron2's detectors do.
    """

    @configurable
    def __init__(self, *, backbone: nn.Module, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        guide_cfg = cfg.clone()
        guide_cfg.defrost()
        guide_cfg.MODEL.BACKBONE.NAME = cfg.MODEL.GUIDE_BACKBONE.NAME
        return {
            "backbone": build_backbone(guide_cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        # The teacher is frozen: BN statistics must never drift, whatever a trainer calls.
        return super().train(False)

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict], image_key: str = "image") -> Dict[str, torch.Tensor]:
        images = [(x[image_key].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(
            images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )
        return self.backbone(images.tensor)


def build_guide_model(cfg, load_weights: bool = True) -> nn.Module:
    """Build ``MODEL.GUIDE_ARCHITECTURE`` (default ``RCNN_FPN_only``), load ``MODEL.GUIDE_WEIGHTS``,
    freeze it and put it in eval mode on ``MODEL.DEVICE``."""
    name = cfg.MODEL.GUIDE_ARCHITECTURE or "RCNN_FPN_only"
    if name not in GUIDE_ARCH_REGISTRY:
        raise KeyError(
            f"MODEL.GUIDE_ARCHITECTURE: {name!r} is not registered; known: {sorted(k for k, _ in GUIDE_ARCH_REGISTRY)}."
        )
    model = GUIDE_ARCH_REGISTRY.get(name)(cfg).to(torch.device(cfg.MODEL.DEVICE))
    if load_weights:
        path = cfg.MODEL.GUIDE_WEIGHTS
        if not path:
            raise ValueError(
                "MODEL.GUIDE_WEIGHTS is empty: stages 1-2 need a trained teacher; give a Detectron2 "
                "Mask R-CNN FPN checkpoint (.pkl or .pth), or let tools/pipeline.py train one (stage 0)."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.GUIDE_WEIGHTS: file {path!r} does not exist.")
        ckpt = AFICheckpointer(model)
        ckpt.load(path, partial=PartialLoad("the teacher", unused_ok=("",)))  # a detector file: only its backbone
        missing = [k for k in ckpt.last_incompatible.missing_keys if k.startswith("backbone.")]
        if missing or ckpt.last_incompatible.incorrect_shapes:
            first = missing[0] if missing else ckpt.last_incompatible.incorrect_shapes[0][0]
            raise ValueError(
                f"MODEL.GUIDE_WEIGHTS {path!r} does not fit the teacher built from MODEL.GUIDE_BACKBONE.NAME="
                f"{cfg.MODEL.GUIDE_BACKBONE.NAME!r} and MODEL.RESNETS/FPN: tensor {first!r} is missing or has "
                "another shape."
            )
    model.requires_grad_(False)
    return model.eval()
