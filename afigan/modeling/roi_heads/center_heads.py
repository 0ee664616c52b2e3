"""``CenterROIHeads``: CenterMask's RoI heads, written against Detectron2's ``ROIHeads`` API.

There is no box head: the proposals are FCOS's final detections. The heads are the SAG-Mask
mask head (any head of Detectron2's ROI_MASK_HEAD registry works) and, with ``MODEL.MASKIOU_ON``,
the MaskIoU head; RoIs are pooled from ``ROI_HEADS.IN_FEATURES`` with the level rule
``ROI_MASK_HEAD.ASSIGN_CRITERION``. Proposal matching and sampling are Detectron2's.
"""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads, select_foreground_proposals
from detectron2.modeling.roi_heads.mask_head import build_mask_head, mask_rcnn_inference, mask_rcnn_loss
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from .maskiou_head import build_maskiou_head, mask_iou_inference, mask_iou_loss, mask_iou_targets
from .ratio_pooler import RatioROIPooler

__all__ = ["CenterROIHeads"]


@ROI_HEADS_REGISTRY.register()
class CenterROIHeads(ROIHeads):
    """Mask (and MaskIoU) heads on given boxes.

    ``forward(images, features, proposals, targets=None)``:

    * training: ``proposals`` carry ``proposal_boxes`` / ``objectness_logits`` (FCOS with
      ``yield_proposal``); they are matched to ``targets`` and sampled as in Detectron2, and the
      foreground ones train the heads. Returns ``(proposals, {"loss_mask"[, "loss_maskiou"]})``.
    * inference: ``proposals`` are detections with ``pred_boxes``, ``scores``, ``pred_classes``.
      Returns them with ``pred_masks`` (B, 1, 2S, 2S) probabilities and, with MaskIoU,
      ``mask_scores`` (= score x predicted mask IoU, in [0, 1]), and ``{}``.
    """

    @configurable
    def __init__(
        self,
        *,
        mask_in_features: List[str],
        mask_pooler: RatioROIPooler,
        mask_head: nn.Module,
        maskiou_head: Optional[nn.Module] = None,
        maskiou_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.mask_in_features = list(mask_in_features)
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.maskiou_head = maskiou_head
        self.maskiou_weight = maskiou_weight

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.MASK_ON:
            raise ValueError(
                "CenterROIHeads only predicts masks: set MODEL.MASK_ON True, or for boxes alone use "
                "MODEL.META_ARCHITECTURE OneStageDetector without ROI heads."
            )
        if cfg.MODEL.KEYPOINT_ON:
            raise ValueError("CenterROIHeads has no keypoint head: set MODEL.KEYPOINT_ON False.")
        ret = super().from_config(cfg)
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES {in_features} names levels the backbone does not output "
                f"({missing}); it outputs {sorted(input_shape)}."
            )
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES must have equal channels, got {sorted(channels)}.")
        channels = channels.pop()
        m = cfg.MODEL.ROI_MASK_HEAD
        res = m.POOLER_RESOLUTION
        pooler = RatioROIPooler(
            output_size=res,
            scales=tuple(1.0 / input_shape[f].stride for f in in_features),
            sampling_ratio=m.POOLER_SAMPLING_RATIO,
            pooler_type=m.POOLER_TYPE,
            assign_criterion=m.ASSIGN_CRITERION,
        )
        shape = ShapeSpec(channels=channels, height=res, width=res)
        ret.update(
            mask_in_features=in_features,
            mask_pooler=pooler,
            mask_head=build_mask_head(cfg, shape),
            maskiou_head=build_maskiou_head(cfg, shape) if cfg.MODEL.MASKIOU_ON else None,
            maskiou_weight=cfg.MODEL.MASKIOU_LOSS_WEIGHT,
        )
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        del images
        if self.training:
            if proposals is None or targets is None:
                raise ValueError("CenterROIHeads needs proposals and targets in training (FCOS must yield proposals).")
            proposals = self.label_and_sample_proposals(proposals, targets)
            return proposals, self._forward_mask_train(features, proposals)
        return self.forward_with_given_boxes(features, proposals), {}

    def _pool(self, features: Dict[str, Tensor], instances: List[Instances], boxes_field: str) -> Tensor:
        feats = [features[f] for f in self.mask_in_features]
        return self.mask_pooler(feats, [x.get(boxes_field) for x in instances], [x.image_size for x in instances])

    def _forward_mask_train(self, features: Dict[str, Tensor], proposals: List[Instances]) -> Dict[str, Tensor]:
        fg, _ = select_foreground_proposals(proposals, self.num_classes)
        roi_features = self._pool(features, fg, "proposal_boxes")
        logits = self.mask_head.layers(roi_features)  # (B, K, 2S, 2S)
        losses = {"loss_mask": mask_rcnn_loss(logits, fg, self.mask_head.vis_period) * self.mask_head.loss_weight}
        if self.maskiou_head is not None:
            gt_classes = cat([x.gt_classes for x in fg]) if fg else logits.new_zeros((0,), dtype=torch.long)
            selected = (
                logits[:, 0]
                if logits.shape[1] == 1
                else logits[torch.arange(len(logits), device=logits.device), gt_classes]
            )
            targets = mask_iou_targets(selected, fg)
            pred_iou = self.maskiou_head(roi_features, selected[:, None].sigmoid())
            losses["loss_maskiou"] = mask_iou_loss(pred_iou, gt_classes, targets, self.maskiou_weight)
        return losses

    def forward_with_given_boxes(self, features: Dict[str, Tensor], instances: List[Instances]) -> List[Instances]:
        """Add ``pred_masks`` (and ``mask_scores``) to detections with ``pred_boxes``/``pred_classes``/``scores``."""
        assert not self.training
        if instances and not (instances[0].has("pred_boxes") and instances[0].has("pred_classes")):
            raise ValueError("CenterROIHeads needs detections with pred_boxes and pred_classes (FCOS proposals).")
        roi_features = self._pool(features, instances, "pred_boxes")
        logits = self.mask_head.layers(roi_features)
        mask_rcnn_inference(logits, instances)
        if self.maskiou_head is not None:
            probs = cat([x.pred_masks for x in instances]) if instances else logits[:, :1].sigmoid()
            mask_iou_inference(self.maskiou_head(roi_features, probs), instances)
        return instances
