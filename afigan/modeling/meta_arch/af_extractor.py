"""Stage 2's multi-scale AF extractor: a GeneralizedRCNN trained on the low-resolution twin.

In training it reads ``image_x{r}`` / ``instances_x{r}`` (r = ``MODEL.AFI.SCALE_RATIO``) and
returns ``(losses, features)`` from ONE backbone pass, so the trainer computes the feature and
adversarial losses on the same features the detection losses used. In inference it is a plain
GeneralizedRCNN on ``image`` (the reference's inference path was broken, B6 of docs/differences_from_reference.md).
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from afigan.config import lr_key

__all__ = ["GeneralizedRCNN_AFExtractor"]


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN_AFExtractor(GeneralizedRCNN):  # noqa: N801 - the reference's registry name
    """GeneralizedRCNN + ``scale_ratio``; training forward -> (loss dict, {"p2": (N, C, h, w), ...})."""

    @configurable
    def __init__(self, *, scale_ratio: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.scale_ratio = scale_ratio

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["scale_ratio"] = cfg.MODEL.AFI.SCALE_RATIO
        return ret

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        image_key, inst_key = lr_key("image", self.scale_ratio), lr_key("instances", self.scale_ratio)
        if image_key not in batched_inputs[0]:
            raise KeyError(f"Stage-2 training inputs need {image_key!r}; build the loader with HRLRDatasetMapper.")
        images = self.preprocess_image([{"image": x[image_key]} for x in batched_inputs])
        gt_instances = [x[inst_key].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses: Dict[str, torch.Tensor] = {**detector_losses, **proposal_losses}
        return losses, features
