"""FCOS as a Detectron2 proposal generator configured by ``MODEL.FCOS.*`` (AdelaiDet/CenterMask2).

As the detector itself it sits in :class:`~afigan.modeling.meta_arch.OneStageDetector`; in
CenterMask it feeds :class:`~afigan.modeling.roi_heads.CenterROIHeads`. Reused from Detectron2:
``FCOSHead`` (via :class:`FCOSScaledHead`), ``DefaultAnchorGenerator`` for the locations,
``Box2BoxTransformLinear`` for decoding, fvcore's focal and GIoU losses, ``batched_nms``.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat, ciou_loss, diou_loss
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from .head import FCOSScaledHead
from .num_classes import NO_ROI_HEAD_ARCHS, check_num_classes
from .targets import centerness_targets, fcos_targets, level_size_ranges

__all__ = ["FCOS", "LOC_LOSS_TYPES", "CLS_NORMALIZERS"]

LOC_LOSS_TYPES = ("giou", "iou", "linear_iou", "diou", "ciou")
CLS_NORMALIZERS = ("fg", "moving_fg", "all")


def _reduce_mean(x: Tensor) -> float:
    """Mean of a scalar over all processes (itself when not distributed)."""
    world = comm.get_world_size()
    if world > 1:
        x = x.detach().clone().float()
        torch.distributed.all_reduce(x)
        x = x / world
    return float(x)


def _box_loss(kind: str, pred: Tensor, target: Tensor) -> Tensor:
    """Per-box loss (B,) between matched (B, 4) XYXY boxes."""
    if kind == "giou":
        return giou_loss(pred, target, reduction="none")
    if kind == "diou":
        return diou_loss(pred, target, reduction="none")
    if kind == "ciou":
        return ciou_loss(pred, target, reduction="none")
    iou = matched_pairwise_iou(Boxes(pred), Boxes(target))
    return -torch.log(iou.clamp(min=1e-6)) if kind == "iou" else 1 - iou


@PROPOSAL_GENERATOR_REGISTRY.register()
class FCOS(nn.Module):
    """FCOS: per-location classification, distances to the box sides and centerness.

    ``forward(images, features, gt_instances=None)`` with ``features`` the backbone's dict of
    (N, C, Hl, Wl) maps returns ``(results, losses)``:

    * training: ``losses`` = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}; ``results`` is
      None, or, when ``yield_proposal``, N Instances with ``proposal_boxes`` and
      ``objectness_logits`` (for ROI heads that sample and match proposals);
    * inference: N Instances with ``pred_boxes``, ``scores`` in [0, 1] (sqrt of class probability
      times centerness), ``pred_classes``; at most ``post_nms_topk[1]`` per image; ``losses`` = {}.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        strides: List[int],
        head: nn.Module,
        num_classes: int,
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        center_sample: bool = True,
        pos_radius: float = 1.5,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        loc_loss_type: str = "giou",
        loss_normalizer_cls: str = "fg",
        loss_weight_cls: float = 1.0,
        pre_nms_thresh: Tuple[float, float] = (0.05, 0.05),
        pre_nms_topk: Tuple[int, int] = (1000, 1000),
        post_nms_topk: Tuple[int, int] = (100, 100),
        nms_thresh: float = 0.6,
        thresh_with_ctr: bool = False,
        yield_proposal: bool = False,
    ):
        """
        Args:
            in_features, strides: the pyramid levels used and their strides.
            head: module mapping L feature maps to (logits, distances in strides, centerness),
                as :class:`FCOSScaledHead`.
            sizes_of_interest: L-1 boundaries of max(l, t, r, b) between consecutive levels.
            pre_nms_thresh, pre_nms_topk, post_nms_topk: (training, test) values.
            Others: the ``MODEL.FCOS`` keys of the same meaning.
        """
        super().__init__()
        if loc_loss_type not in LOC_LOSS_TYPES:
            raise ValueError(f"MODEL.FCOS.LOC_LOSS_TYPE must be one of {LOC_LOSS_TYPES}, got {loc_loss_type!r}.")
        if loss_normalizer_cls not in CLS_NORMALIZERS:
            raise ValueError(
                f"MODEL.FCOS.LOSS_NORMALIZER_CLS must be one of {CLS_NORMALIZERS}, got {loss_normalizer_cls!r}."
            )
        self.in_features = list(in_features)
        self.strides = [int(s) for s in strides]
        self.head = head
        self.num_classes = num_classes
        self.size_ranges = level_size_ranges(sizes_of_interest, len(self.in_features))
        # One square "anchor" of side = stride per location, centred on the cell (offset 0.5) as
        # in AdelaiDet; Box2BoxTransformLinear then measures distances in strides.
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in self.strides], aspect_ratios=[1.0], strides=self.strides, offset=0.5
        )
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=True)
        self.center_sample = center_sample
        self.pos_radius = pos_radius
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.loc_loss_type = loc_loss_type
        self.loss_normalizer_cls = loss_normalizer_cls
        self.loss_weight_cls = loss_weight_cls
        self.moving_num_fg = 100.0  # AdelaiDet's start value for the "moving_fg" normaliser
        self.pre_nms_thresh = tuple(pre_nms_thresh)
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.nms_thresh = nms_thresh
        self.thresh_with_ctr = thresh_with_ctr
        self.yield_proposal = yield_proposal

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        f = cfg.MODEL.FCOS
        missing = [k for k in f.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {list(f.IN_FEATURES)} names levels the backbone does not "
                f"output ({missing}); it outputs {sorted(input_shape)} (check MODEL.FCOS.TOP_LEVELS "
                "and the backbone)."
            )
        strides = [input_shape[k].stride for k in f.IN_FEATURES]
        if list(f.FPN_STRIDES) != strides:
            raise ValueError(
                f"MODEL.FCOS.FPN_STRIDES {list(f.FPN_STRIDES)} do not match the strides {strides} of "
                f"{list(f.IN_FEATURES)}; set MODEL.FCOS.FPN_STRIDES to {strides}."
            )
        check_num_classes(cfg)
        head = FCOSScaledHead(
            input_shape=[input_shape[k] for k in f.IN_FEATURES],
            num_classes=f.NUM_CLASSES,
            num_cls_convs=f.NUM_CLS_CONVS,
            num_box_convs=f.NUM_BOX_CONVS,
            num_share_convs=f.NUM_SHARE_CONVS,
            norm=f.NORM,
            prior_prob=f.PRIOR_PROB,
            use_scale=f.USE_SCALE,
            use_relu=f.USE_RELU,
            use_deformable=f.USE_DEFORMABLE,
        )
        return dict(
            in_features=f.IN_FEATURES,
            strides=strides,
            head=head,
            num_classes=f.NUM_CLASSES,
            sizes_of_interest=f.SIZES_OF_INTEREST,
            center_sample=f.CENTER_SAMPLE,
            pos_radius=f.POS_RADIUS,
            focal_loss_alpha=f.LOSS_ALPHA,
            focal_loss_gamma=f.LOSS_GAMMA,
            loc_loss_type=f.LOC_LOSS_TYPE,
            loss_normalizer_cls=f.LOSS_NORMALIZER_CLS,
            loss_weight_cls=f.LOSS_WEIGHT_CLS,
            pre_nms_thresh=(f.INFERENCE_TH_TRAIN, f.INFERENCE_TH_TEST),
            pre_nms_topk=(f.PRE_NMS_TOPK_TRAIN, f.PRE_NMS_TOPK_TEST),
            post_nms_topk=(f.POST_NMS_TOPK_TRAIN, f.POST_NMS_TOPK_TEST),
            nms_thresh=f.NMS_TH,
            thresh_with_ctr=f.THRESH_WITH_CTR,
            # R-CNN meta-architectures hand the proposals to their ROI heads, also while training.
            yield_proposal=f.YIELD_PROPOSAL or cfg.MODEL.META_ARCHITECTURE not in NO_ROI_HEAD_ARCHS,
        )

    def forward(
        self, images: ImageList, features: Dict[str, Tensor], gt_instances: Optional[List[Instances]] = None
    ) -> Tuple[Optional[List[Instances]], Dict[str, Tensor]]:
        feats = [features[k] for k in self.in_features]
        logits, deltas, ctrness = self.head(feats)
        anchors = self.anchor_generator(feats)
        # (N, K, H, W) -> (N, H*W, K), in the order of the anchor generator's locations.
        logits = [permute_to_N_HWA_K(x, self.num_classes) for x in logits]
        deltas = [permute_to_N_HWA_K(x, 4) for x in deltas]
        ctrness = [permute_to_N_HWA_K(x, 1).squeeze(2) for x in ctrness]
        if not self.training:
            return self.predict(anchors, logits, deltas, ctrness, images.image_sizes), {}
        if gt_instances is None:
            raise ValueError("FCOS needs ground-truth instances in training; the inputs carry no 'instances'.")
        losses = self.losses(anchors, logits, deltas, ctrness, gt_instances)
        proposals = None
        if self.yield_proposal:
            with torch.no_grad():
                proposals = self.predict(
                    anchors,
                    [x.detach() for x in logits],
                    [x.detach() for x in deltas],
                    [x.detach() for x in ctrness],
                    images.image_sizes,
                )
        return proposals, losses

    @torch.no_grad()
    def label_locations(self, anchors: List[Boxes], gt_instances: List[Instances]) -> Tuple[Tensor, Tensor]:
        """Targets of every location: labels (N, R) (``num_classes`` = background) and assigned
        boxes (N, R, 4), for L levels of anchors (Rl, 4) concatenated in level order."""
        anchor_tensor = Boxes.cat(anchors).tensor
        points = (anchor_tensor[:, :2] + anchor_tensor[:, 2:]) / 2
        strides = anchor_tensor[:, 2] - anchor_tensor[:, 0]
        size_ranges = cat(
            [anchor_tensor.new_tensor(r)[None].expand(len(a), 2) for r, a in zip(self.size_ranges, anchors)]
        )
        labels, boxes = zip(
            *[
                fcos_targets(
                    points,
                    strides,
                    size_ranges,
                    inst.gt_boxes.tensor,
                    inst.gt_classes,
                    self.num_classes,
                    self.center_sample,
                    self.pos_radius,
                )
                for inst in gt_instances
            ]
        )
        return torch.stack(labels), torch.stack(boxes)

    def losses(
        self,
        anchors: List[Boxes],
        logits: List[Tensor],
        deltas: List[Tensor],
        ctrness: List[Tensor],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """Focal classification, centerness-weighted box loss and centerness BCE.

        ``anchors``: L Boxes (Rl, 4); ``logits``/``deltas``/``ctrness``: L tensors (N, Rl, K|4)
        / (N, Rl). Normalised as in AdelaiDet (positives averaged over processes; the box loss
        by the sum of centerness targets). Computed in float32, also under autocast (AMP).
        """
        with torch.autocast(device_type=logits[0].device.type, enabled=False):
            return self._losses(anchors, logits, deltas, ctrness, gt_instances)

    def _losses(self, anchors, logits, deltas, ctrness, gt_instances) -> Dict[str, Tensor]:
        anchor_tensor = Boxes.cat(anchors).tensor  # (R, 4)
        labels, boxes = self.label_locations(anchors, gt_instances)
        logits, deltas, ctrness = (cat(x, dim=1).float() for x in (logits, deltas, ctrness))

        pos = labels != self.num_classes
        num_pos = pos.sum()
        num_pos_avg = max(_reduce_mean(num_pos), 1.0)
        get_event_storage().put_scalar("fcos/num_pos_per_image", float(num_pos) / max(len(gt_instances), 1))
        if self.loss_normalizer_cls == "fg":
            cls_norm = num_pos_avg
        elif self.loss_normalizer_cls == "moving_fg":
            self.moving_num_fg = 0.9 * self.moving_num_fg + 0.1 * num_pos_avg
            cls_norm = self.moving_num_fg
        else:
            # On the logits' device: NCCL's all_reduce in _reduce_mean takes CUDA tensors only.
            cls_norm = max(_reduce_mean(torch.tensor(float(labels.numel()), device=logits.device)), 1.0)
        target = F.one_hot(labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss_cls = (
            sigmoid_focal_loss_jit(
                logits, target, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="sum"
            )
            / cls_norm
        )

        pos_anchors = anchor_tensor[None].expand_as(boxes)[pos]
        pos_boxes = boxes[pos]
        ctr_targets = centerness_targets((pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2, pos_boxes)
        pred_boxes = self.box2box_transform.apply_deltas(deltas[pos], pos_anchors)
        ctr_norm = max(_reduce_mean(ctr_targets.sum()), 1e-6)
        loss_loc = (_box_loss(self.loc_loss_type, pred_boxes, pos_boxes) * ctr_targets).sum() / ctr_norm
        loss_ctr = F.binary_cross_entropy_with_logits(ctrness[pos], ctr_targets, reduction="sum") / num_pos_avg
        return {"loss_fcos_cls": loss_cls * self.loss_weight_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}

    @torch.no_grad()
    def predict(
        self,
        anchors: List[Boxes],
        logits: List[Tensor],
        deltas: List[Tensor],
        ctrness: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Boxes per image after thresholding, per-level top-k, class-aware NMS and a per-image
        top-k. In training (proposals for ROI heads) the fields are ``proposal_boxes`` and
        ``objectness_logits``; at test ``pred_boxes``, ``scores``, ``pred_classes``."""
        t = 0 if self.training else 1
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes_all, scores_all, classes_all = [], [], []
            for anchors_l, logits_l, deltas_l, ctr_l in zip(anchors, logits, deltas, ctrness):
                cls_prob = logits_l[i].sigmoid()  # (Rl, K)
                ctr_prob = ctr_l[i].sigmoid()[:, None]
                scores = cls_prob * ctr_prob
                candidates = (scores if self.thresh_with_ctr else cls_prob) > self.pre_nms_thresh[t]
                scores = scores[candidates]
                idx = candidates.nonzero()
                scores, top = scores.topk(_topk_count(scores, self.pre_nms_topk[t]))
                loc, cls_idx = idx[top].unbind(dim=1)
                boxes_all.append(self.box2box_transform.apply_deltas(deltas_l[i][loc], anchors_l.tensor[loc]))
                scores_all.append(scores)
                classes_all.append(cls_idx)
            boxes = Boxes(cat(boxes_all))
            boxes.clip(image_size)
            scores, classes = cat(scores_all), cat(classes_all)
            keep = boxes.nonempty(threshold=0.0)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            keep = batched_nms(boxes.tensor, scores, classes, self.nms_thresh)[: self.post_nms_topk[t]]
            # sqrt(cls * ctr), as AdelaiDet and Detectron2's FCOS report it: a probability in [0, 1].
            scores = torch.sqrt(scores[keep])
            if self.training:
                results.append(
                    Instances(image_size, proposal_boxes=boxes[keep], objectness_logits=torch.logit(scores, eps=1e-6))
                )
            else:
                results.append(Instances(image_size, pred_boxes=boxes[keep], scores=scores, pred_classes=classes[keep]))
        return results


def _topk_count(scores: Tensor, k: int):
    """min(number of candidates, k). Under tracing the count is a 0-dim tensor (Python's min()
    would freeze the traced image's count into the graph), as in Detectron2's dense detectors."""
    n = scores.shape[0]
    return torch.clamp(n, max=k) if isinstance(n, Tensor) else min(n, k)
