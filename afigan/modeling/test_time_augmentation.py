"""Multi-scale / flip test-time augmentation (``TEST.AUG.*``, the † rows of the README's results
table) for every afigan detector kind that has it.

* R-CNN detectors (Mask / Faster R-CNN, Cascade (Mask) R-CNN, any neck): Detectron2's own
  ``GeneralizedRCNNWithTTA`` (boxes of every augmented image merged by the box head's NMS, masks
  averaged over the augmented images on the merged boxes).
* One-stage detectors whose boxes are FCOS's — FCOS itself (``OneStageDetector``) and CenterMask
  (``GeneralizedRCNN`` with ``CenterROIHeads``, which has no box head to re-score the union of
  the boxes): :class:`OneStageWithTTA`.

:class:`OneStageWithTTA` runs the backbone and FCOS on every image of Detectron2's
``DatasetMapperTTA`` (each ``TEST.AUG.MIN_SIZES`` with ``TEST.AUG.MAX_SIZE``, and each also
flipped when ``TEST.AUG.FLIP``), maps the boxes back to the original image and merges them with
**class-aware NMS** at FCOS's own threshold and detection count (``MODEL.FCOS.NMS_TH``,
``POST_NMS_TOPK_TEST``). NMS rather than box voting: it is the post-processing FCOS already
applies to one image, so one scale without flip gives exactly the plain model's detections, and
the merged scores stay FCOS's. CenterMask's masks are then predicted again on the merged boxes
in every augmented image (flipped ones flipped back) and averaged — as Detectron2 does for
Mask R-CNN — rather than kept from the image that produced the box: a box kept from one scale
gets a mask that saw every scale, and the MaskIoU head's ``mask_scores`` (score x predicted mask
IoU) are averaged the same way.
"""

import copy
from typing import Dict, List

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.layers import batched_nms, cat
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, ImageList, Instances
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .fcos import FCOS, OneStageDetector
from .roi_heads import CenterROIHeads

__all__ = ["OneStageWithTTA", "build_tta_model", "is_one_stage"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_one_stage(model: nn.Module) -> bool:
    """True for the detectors whose final boxes are FCOS's: FCOS and CenterMask."""
    model = _unwrap(model)
    if isinstance(model, OneStageDetector):
        return isinstance(model.proposal_generator, FCOS)
    return (
        isinstance(model, GeneralizedRCNN)
        and isinstance(model.proposal_generator, FCOS)
        and isinstance(model.roi_heads, CenterROIHeads)
    )


def build_tta_model(cfg, model: nn.Module) -> nn.Module:
    """The test-time-augmentation wrapper of ``model`` (see the module docstring), or one
    sentence when its kind has none."""
    inner = _unwrap(model)
    if is_one_stage(inner):
        return OneStageWithTTA(cfg, inner)
    if isinstance(inner, GeneralizedRCNN):
        if cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError(
                "TEST.AUG.ENABLED: Detectron2's R-CNN test-time augmentation has no keypoint or "
                "precomputed-proposal support; set TEST.AUG.ENABLED False."
            )
        return GeneralizedRCNNWithTTA(cfg, inner)
    raise ValueError(
        f"TEST.AUG.ENABLED: {cfg.MODEL.META_ARCHITECTURE} ({type(inner).__name__}) has no test-time "
        f"augmentation (R-CNN detectors, FCOS and CenterMask have); set TEST.AUG.ENABLED False."
    )


class OneStageWithTTA(nn.Module):
    """FCOS or CenterMask with multi-scale / flip testing; called like the model in eval mode (a
    list of input dicts -> a list of ``{"instances": Instances}`` in each input's height x width)."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 3):
        super().__init__()
        model = _unwrap(model)
        if not is_one_stage(model):
            raise ValueError(
                f"OneStageWithTTA needs FCOS (OneStageDetector) or CenterMask, got {type(model).__name__}; "
                f"R-CNN detectors use Detectron2's GeneralizedRCNNWithTTA (afigan.modeling.build_tta_model)."
            )
        self.model = model
        self.tta_mapper = tta_mapper or DatasetMapperTTA(cfg)
        self.batch_size = batch_size
        fcos = model.proposal_generator
        self.nms_thresh = fcos.nms_thresh
        self.max_detections = fcos.post_nms_topk[1]
        self.predicts_masks = isinstance(model, GeneralizedRCNN)
        self.input_format = cfg.INPUT.FORMAT  # ProposalNetwork keeps no input_format of its own

    def _images(self, inputs: List[Dict]) -> ImageList:
        model = self.model
        if isinstance(model, GeneralizedRCNN):
            return model.preprocess_image(inputs)
        # ProposalNetwork (OneStageDetector) normalises inline in its forward; the same here.
        images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in inputs]
        return ImageList.from_tensors(
            images, model.backbone.size_divisibility, padding_constraints=model.backbone.padding_constraints
        )

    def _chunks(self, items: List):
        for i in range(0, len(items), self.batch_size):
            yield items[i : i + self.batch_size]

    @torch.no_grad()
    def _detect(self, inputs: List[Dict]) -> List[Instances]:
        """FCOS's detections (pred_boxes, scores, pred_classes) of every augmented image, in its
        own coordinates."""
        out = []
        for chunk in self._chunks(inputs):
            images = self._images(chunk)
            detections, _ = self.model.proposal_generator(images, self.model.backbone(images.tensor))
            out.extend(detections)
        return out

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]

    def _with_image(self, dataset_dict: Dict) -> Dict:
        # As GeneralizedRCNNWithTTA: an input without "image" is read from its "file_name".
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        ret.setdefault("height", ret["image"].shape[1])
        ret.setdefault("width", ret["image"].shape[2])
        return ret

    @torch.no_grad()
    def _inference_one_image(self, input: Dict) -> Dict:
        orig_shape = (input["height"], input["width"])
        augmented = self.tta_mapper(input)
        tfms = [x.pop("transforms") for x in augmented]
        detections = self._detect(augmented)
        boxes = cat(
            [
                torch.from_numpy(t.inverse().apply_box(d.pred_boxes.tensor.cpu().numpy()))
                .to(d.pred_boxes.device)
                .float()
                for d, t in zip(detections, tfms)
            ]
        )
        scores = cat([d.scores for d in detections])
        classes = cat([d.pred_classes for d in detections])
        keep = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.max_detections]
        merged = Instances(orig_shape, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep])
        if self.predicts_masks:
            self._add_masks(merged, augmented, tfms)
        return {"instances": detector_postprocess(merged, *orig_shape)}

    def _add_masks(self, merged: Instances, augmented: List[Dict], tfms) -> None:
        """CenterMask: masks (and mask scores) of the merged boxes, averaged over the augmented images."""
        given = []
        for x, t in zip(augmented, tfms):
            box = torch.from_numpy(t.apply_box(merged.pred_boxes.tensor.cpu().numpy())).float()
            given.append(
                Instances(
                    tuple(x["image"].shape[1:3]),
                    pred_boxes=Boxes(box),
                    scores=merged.scores,
                    pred_classes=merged.pred_classes,
                )
            )
        outputs = []
        for inputs, instances in zip(self._chunks(augmented), self._chunks(given)):
            outputs.extend(self.model.inference(inputs, instances, do_postprocess=False))
        masks = [
            o.pred_masks.flip(dims=[3]) if any(isinstance(s, HFlipTransform) for s in t.transforms) else o.pred_masks
            for o, t in zip(outputs, tfms)
        ]
        merged.pred_masks = torch.stack(masks).mean(dim=0)
        if all(o.has("mask_scores") for o in outputs):
            merged.mask_scores = torch.stack([o.mask_scores for o in outputs]).mean(dim=0)
