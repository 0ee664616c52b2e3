"""The MaskIoU head (Mask Scoring R-CNN, as used by CenterMask): predicts the IoU of each
predicted mask with its ground truth, and at test time rescales the mask score with it.

Targets: IoU of the binarised predicted RoI mask with the ground-truth mask, where the union
counts the *whole* ground-truth object, also the part outside the RoI (CenterMask2 obtains the
same quantity through polygon cropping; here it comes from the full mask area mapped into RoI
pixels, which works for polygons and bitmasks alike).
"""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, cat
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils.registry import Registry
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ROI_MASKIOU_HEAD_REGISTRY",
    "MaskIoUHead",
    "build_maskiou_head",
    "mask_areas",
    "mask_iou_targets",
    "mask_iou_loss",
    "mask_iou_inference",
]

ROI_MASKIOU_HEAD_REGISTRY = Registry("ROI_MASKIOU_HEAD")
ROI_MASKIOU_HEAD_REGISTRY.__doc__ = """Heads that predict the IoU of a predicted mask, called with
``obj(cfg, input_shape)`` (``input_shape``: the RoI features' ShapeSpec)."""


@ROI_MASKIOU_HEAD_REGISTRY.register()
class MaskIoUHead(nn.Module):
    """RoI features (B, C, S, S) and mask probabilities (B, 1, 2S, 2S) -> IoU per class (B, K).

    The mask is max-pooled to S x S and concatenated to the features; ``num_conv`` 3x3 convs
    (the last with stride 2), two FC layers of ``fc_dim`` and a linear layer of K outputs follow.
    Module names follow CenterMask2 (``maskiou_fcn{k}``, ``maskiou_fc1/2``, ``maskiou``).
    """

    @configurable
    def __init__(
        self, *, input_shape: ShapeSpec, num_classes: int, conv_dim: int = 256, num_conv: int = 4, fc_dim: int = 1024
    ):
        super().__init__()
        if num_conv < 1:
            raise ValueError(f"MODEL.ROI_MASKIOU_HEAD.NUM_CONV must be at least 1, got {num_conv}.")
        channels = input_shape.channels + 1
        self.convs = []
        for k in range(num_conv):
            conv = Conv2d(channels, conv_dim, 3, stride=2 if k == num_conv - 1 else 1, padding=1, activation=F.relu)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.add_module(f"maskiou_fcn{k + 1}", conv)
            self.convs.append(conv)
            channels = conv_dim
        side = (input_shape.height + 1) // 2
        self.maskiou_fc1 = nn.Linear(conv_dim * side * side, fc_dim)
        self.maskiou_fc2 = nn.Linear(fc_dim, fc_dim)
        for fc in (self.maskiou_fc1, self.maskiou_fc2):
            # fan_in keeps the activations' scale; CenterMask2's fan_out multiplies it by about
            # sqrt(in / out) (3.5x at 12544 -> 1024), and its L2 loss then diverged within ten
            # iterations on the toy set.
            nn.init.kaiming_normal_(fc.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        self.maskiou = nn.Linear(fc_dim, num_classes)
        nn.init.normal_(self.maskiou.weight, std=0.01)
        nn.init.zeros_(self.maskiou.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        h = cfg.MODEL.ROI_MASKIOU_HEAD
        return dict(
            input_shape=input_shape,
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=h.CONV_DIM,
            num_conv=h.NUM_CONV,
            fc_dim=h.FC_DIM,
        )

    def forward(self, features: Tensor, mask_probs: Tensor) -> Tensor:
        x = torch.cat([features, F.max_pool2d(mask_probs, kernel_size=2, stride=2)], dim=1)
        for conv in self.convs:
            x = conv(x)
        x = F.relu(self.maskiou_fc1(x.flatten(1)))
        x = F.relu(self.maskiou_fc2(x))
        return self.maskiou(x)


def build_maskiou_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """The head named by ``MODEL.ROI_MASKIOU_HEAD.NAME``."""
    return ROI_MASKIOU_HEAD_REGISTRY.get(cfg.MODEL.ROI_MASKIOU_HEAD.NAME)(cfg, input_shape)


def mask_areas(masks, device=None) -> Tensor:
    """Area in image pixels of each mask of a ``PolygonMasks`` or ``BitMasks`` -> (M,) float, on
    ``device`` (polygons: made there directly; bit masks: where they are, unless given)."""
    if isinstance(masks, PolygonMasks):
        return torch.as_tensor(masks.area(), dtype=torch.float32, device=device)
    if isinstance(masks, BitMasks):
        return masks.tensor.flatten(1).sum(dim=1).float().to(device or masks.tensor.device)
    raise TypeError(f"gt_masks must be PolygonMasks or BitMasks, got {type(masks).__name__}.")


@torch.no_grad()
def mask_iou_targets(mask_logits: Tensor, instances: List[Instances]) -> Tensor:
    """IoU targets (B,) for the foreground proposals ``instances`` (fields ``proposal_boxes``,
    ``gt_masks``) and their selected mask logits (B, M, M) (already indexed by gt class).

    overlap = |pred & gt_roi|; union = |pred| + |whole gt object in RoI pixels| - overlap,
    the whole object being its image area times M^2 / box area.
    """
    side = mask_logits.shape[-1]
    gt_roi, full = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        boxes = inst.proposal_boxes.tensor
        gt_roi.append(inst.gt_masks.crop_and_resize(boxes, side).to(mask_logits.device))
        box_area = inst.proposal_boxes.area().clamp(min=1e-6)
        full.append(mask_areas(inst.gt_masks, mask_logits.device) * side * side / box_area)
    if not gt_roi:
        return mask_logits.new_zeros((0,))
    gt_roi, full = cat(gt_roi).bool(), cat(full)
    pred = mask_logits > 0
    overlap = (pred & gt_roi).flatten(1).sum(dim=1).float()
    # The full object is at least what is visible in the RoI (rasterisation can disagree slightly).
    full = torch.maximum(full, gt_roi.flatten(1).sum(dim=1).float())
    union = (pred.flatten(1).sum(dim=1).float() + full - overlap).clamp(min=1.0)
    return overlap / union


def mask_iou_loss(pred_iou: Tensor, gt_classes: Tensor, targets: Tensor, loss_weight: float = 1.0) -> Tensor:
    """L2 loss 0.5 * (pred - target)^2 averaged over RoIs with a positive target (Mask Scoring R-CNN).

    ``pred_iou`` (B, K), ``gt_classes`` (B,), ``targets`` (B,) -> scalar (0 with a graph when none).
    """
    if pred_iou.shape[1] == 1:
        gt_classes = torch.zeros_like(gt_classes)
    pred = pred_iou[torch.arange(len(gt_classes), device=pred_iou.device), gt_classes]
    pos = targets > 0
    if not pos.any():
        return pred_iou.sum() * 0
    return loss_weight * 0.5 * ((pred[pos] - targets[pos]) ** 2).sum() / pos.sum()


def mask_iou_inference(pred_iou: Tensor, instances: List[Instances]) -> None:
    """Set ``mask_scores = scores * IoU`` on each Instances, the IoU predicted for the predicted
    class and clamped to [0, 1] so the mask score stays a probability."""
    classes = cat([i.pred_classes for i in instances]) if instances else pred_iou.new_zeros((0,), dtype=torch.long)
    if pred_iou.shape[1] == 1:
        classes = torch.zeros_like(classes)
    # shape[0], not len(): a traced value under tracing, so the graph fits any number of detections.
    ious = pred_iou[torch.arange(classes.shape[0], device=pred_iou.device), classes].clamp(0, 1)
    # __len__(), not len() (which makes an int of it): traced counts, as Detectron2's
    # patch_builtin_len gives its own ROI heads under tracing.
    for iou, inst in zip(ious.split([i.__len__() for i in instances]), instances):
        inst.mask_scores = inst.scores * iou
