"""Grad-CAM on a detector's neck levels (``tools/visualize_features.py``).

For one image, the neck's output levels ``F_l`` (N = 1, C, H_l, W_l) are made leaves of the
autograd graph and one score ``s_l`` per level is differentiated w.r.t. them:

    w_c = mean_{y,x} ds_l / dF_l[c, y, x],   CAM_l = ReLU(sum_c w_c F_l[c])

(Selvaraju et al.'s Grad-CAM with the neck level as the "last conv layer"). The *target* is the
model's top detection (highest ``scores`` of its ordinary inference output): box ``b``, class
``k``. What ``s_l`` is:

* **two-stage** (meta-architectures with a box head: Mask/Faster R-CNN; Cascade R-CNN): ``b`` is
  RoIAligned from level ``l`` alone, with the box pooler's own ROIAlign for that level, and run
  through the box head and box predictor; ``s_l`` is the pre-softmax logit of class ``k`` (Cascade:
  the mean of its stages' logits). The real model pools ``b`` from one level only (Detectron2's
  level assignment, marked in the figure), so the other levels' maps answer "what would the box
  head see there". Levels the box head never reads (e.g. P6, RPN only) get no map.
* **one-stage** (FCOS, also CenterMask's FCOS boxes; RetinaNet): ``s_l`` is the class-``k``
  logit of the dense head at the level-``l`` location whose stride x stride cell contains the
  centre of ``b`` (RetinaNet: the largest over that location's anchors). The head runs on all
  levels at once (its norms can be per level).

Without any detection the target is the highest class score over all proposals (two-stage: the
box head's softmax over the RPN proposals, background excluded) or all locations (one-stage:
sigmoid of the class logits), and the result says so.
"""

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes, ImageList
from torch import Tensor, nn

__all__ = ["Target", "GradCAM", "neck_levels", "grad_cam", "cam_from_gradient", "quiet_inference"]


@contextmanager
def quiet_inference():
    """Silence the two notices that building and running Detectron2 models on torch 2.14 print,
    and nothing else: the ``torch.meshgrid`` indexing warning (Detectron2's anchor generator and
    its Swin's relative position table call it without ``indexing``) and torch.fx's log line
    about ``is_fx_tracing`` (Detectron2's ``detectron2/utils/tracing.py`` asks it on every forward)."""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
            yield
    finally:
        fx_log.setLevel(level)


@dataclass
class Target:
    """What the CAMs explain: ``box`` (x0, y0, x1, y1) in the resized image, class index, score,
    and ``source``: ``"top detection"`` or the no-detection sentence."""

    box: Tuple[float, float, float, float]
    cls: int
    score: float
    source: str = "top detection"

    @property
    def detected(self) -> bool:
        return self.source == "top detection"


@dataclass
class GradCAM:
    """Per level (finest first): ``features`` (C, h, w) and ``cams`` (h, w, >= 0, not normalised;
    None where the score does not read the level), both cropped to the image (no padding);
    ``strides``; the ``target``; ``head``: "two-stage" or "one-stage"; ``assigned``: the level a
    two-stage model pools the target box from."""

    features: Dict[str, Tensor]
    cams: Dict[str, Optional[Tensor]]
    strides: Dict[str, int]
    target: Target
    head: str
    image_size: Tuple[int, int]
    assigned: Optional[str] = None
    notes: Dict[str, str] = field(default_factory=dict)


def neck_levels(model: nn.Module, max_stride: int = 64) -> List[str]:
    """The neck's output levels with stride <= ``max_stride`` (P2..P6 at most), finest first."""
    shapes = model.backbone.output_shape()
    return [k for k in sorted(shapes, key=lambda k: shapes[k].stride) if shapes[k].stride <= max_stride]


def cam_from_gradient(feature: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM of one level: (1, C, H, W) feature and gradient -> (H, W), ReLU(sum_c w_c F_c)
    with w_c the spatial mean of the gradient."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * feature).sum(dim=1))[0]


def _head_kind(model: nn.Module) -> str:
    roi = getattr(model, "roi_heads", None)
    if roi is not None and hasattr(roi, "box_pooler") and hasattr(roi, "box_predictor"):
        return "roi"
    pg = getattr(model, "proposal_generator", None)
    if pg is not None and all(hasattr(pg, a) for a in ("head", "strides", "in_features", "num_classes")):
        return "fcos"
    if isinstance(model, RetinaNet):
        return "retinanet"
    raise ValueError(
        f"Grad-CAM supports detectors with a box head, an FCOS head or a RetinaNet head; "
        f"{type(model).__name__} has none of them."
    )


def _detections(model: nn.Module, inputs) -> Optional[Target]:
    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):
            inst = model.inference(inputs, do_postprocess=False)[0]
        else:
            inst = model(inputs)[0]["instances"]
    if not len(inst):
        return None
    i = int(inst.scores.argmax())
    return Target(tuple(float(v) for v in inst.pred_boxes.tensor[i]), int(inst.pred_classes[i]), float(inst.scores[i]))


def _preprocess(model: nn.Module, inputs) -> ImageList:
    """The model's normalised, padded batch, as its forward builds it (Detectron2's
    ProposalNetwork, the base of FCOS's OneStageDetector, does it inline)."""
    if hasattr(model, "preprocess_image"):
        return model.preprocess_image(inputs)
    images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in inputs]
    return ImageList.from_tensors(
        images, model.backbone.size_divisibility, padding_constraints=model.backbone.padding_constraints
    )


def _roi_logits(roi_heads: nn.Module, pooled: Tensor) -> Tensor:
    """(B, C, S, S) pooled box features -> (B, K + 1) class logits (Cascade: mean over stages)."""
    if isinstance(roi_heads.box_head, nn.ModuleList):
        return torch.stack(
            [pred(head(pooled))[0] for head, pred in zip(roi_heads.box_head, roi_heads.box_predictor)]
        ).mean(0)
    return roi_heads.box_predictor(roi_heads.box_head(pooled))[0]


def _two_stage_scores(model, images, leaves: Dict[str, Tensor], target: Optional[Target]):
    roi = model.roi_heads
    in_features = list(roi.box_in_features)
    if target is None:
        with torch.no_grad():
            proposals = model.proposal_generator(images, leaves, None)[0][0].proposal_boxes
            logits = _roi_logits(roi, roi.box_pooler([leaves[f] for f in in_features], [proposals]))
            probs = logits.softmax(dim=1)[:, :-1]  # the last column is background
        best = int(probs.argmax())
        i, k = divmod(best, probs.shape[1])
        target = Target(
            tuple(float(v) for v in proposals.tensor[i]),
            k,
            float(probs[i, k]),
            f"no detection: highest class score over the {len(proposals)} RPN proposals",
        )
    box = Boxes(torch.tensor([target.box], device=images.tensor.device))
    rois = convert_boxes_to_pooler_format([box])
    pooler = roi.box_pooler
    pooled = torch.cat([pooler.level_poolers[j](leaves[f], rois) for j, f in enumerate(in_features)])
    logits = _roi_logits(roi, pooled)[:, target.cls]
    level = assign_boxes_to_levels(
        [box], pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    assigned = in_features[int(level[0])] if len(in_features) > 1 else in_features[0]
    return dict(zip(in_features, logits)), target, assigned


def _dense_logits(model, kind: str, leaves: Dict[str, Tensor]):
    """{level: (K, A, H, W) class logits} of the dense head, run on all its levels at once."""
    if kind == "fcos":
        fcos = model.proposal_generator
        names, k = list(fcos.in_features), fcos.num_classes
        logits = fcos.head([leaves[f] for f in names])[0]
    else:
        names, k = list(model.head_in_features), model.num_classes
        logits = model.head([leaves[f] for f in names])[0]
    return {n: x[0].view(-1, k, *x.shape[-2:]).transpose(0, 1) for n, x in zip(names, logits)}


def _one_stage_scores(model, kind: str, leaves: Dict[str, Tensor], strides: Dict[str, int], target: Optional[Target]):
    logits = _dense_logits(model, kind, leaves)
    if target is None:
        best = None
        for name, x in logits.items():
            p = x.detach().sigmoid().amax(dim=1)  # (K, H, W), best anchor
            v, i = p.flatten().max(0)
            if best is None or float(v) > best[0]:
                k, rest = divmod(int(i), p.shape[1] * p.shape[2])
                best = (float(v), name, k, *divmod(rest, p.shape[2]))
        v, name, k, y, x = best
        s = strides[name]
        box = ((x + 0.5) * s - s / 2, (y + 0.5) * s - s / 2, (x + 0.5) * s + s / 2, (y + 0.5) * s + s / 2)
        target = Target(box, k, v, f"no detection: highest class score over all locations (at {name})")
    cx, cy = (target.box[0] + target.box[2]) / 2, (target.box[1] + target.box[3]) / 2
    scores = {}
    for name, x in logits.items():
        s = strides[name]
        iy = min(max(int(math.floor(cy / s)), 0), x.shape[2] - 1)
        ix = min(max(int(math.floor(cx / s)), 0), x.shape[3] - 1)
        scores[name] = x[target.cls, :, iy, ix].max()
    return scores, target


def grad_cam(model: nn.Module, image: Tensor, levels: Optional[Sequence[str]] = None) -> GradCAM:
    """Grad-CAM of ``model`` (put in eval mode) on one resized float (3, H, W) image in the model's
    ``INPUT.FORMAT``, for ``levels`` (default :func:`neck_levels`); see the module docstring."""
    with quiet_inference():
        return _grad_cam(model, image, levels)


def _grad_cam(model: nn.Module, image: Tensor, levels: Optional[Sequence[str]]) -> GradCAM:
    model.eval()
    kind = _head_kind(model)
    image = image.to(model.device)
    inputs = [{"image": image}]
    target = _detections(model, inputs)
    images = _preprocess(model, inputs)
    with torch.no_grad():
        features = model.backbone(images.tensor)
    shapes = model.backbone.output_shape()
    levels = list(levels) if levels else neck_levels(model)
    missing = [l for l in levels if l not in features]
    if missing:
        raise ValueError(f"--levels: the neck has no level {missing[0]!r}; it outputs {sorted(features)}.")
    strides = {k: int(shapes[k].stride) for k in features}
    leaves = {k: v.detach().requires_grad_(True) for k, v in features.items()}
    assigned = None
    with torch.enable_grad():
        if kind == "roi":
            scores, target, assigned = _two_stage_scores(model, images, leaves, target)
        else:
            scores, target = _one_stage_scores(model, kind, leaves, strides, target)
        used = [l for l in levels if l in scores]
        grads = (
            torch.autograd.grad(sum(scores[l] for l in used), [leaves[l] for l in used], allow_unused=True)
            if used
            else []
        )
    h, w = images.image_sizes[0]
    h, w = int(h), int(w)
    crop = {l: (math.ceil(h / strides[l]), math.ceil(w / strides[l])) for l in levels}
    feats = {l: features[l][0, :, : crop[l][0], : crop[l][1]].detach().cpu() for l in levels}
    cams: Dict[str, Optional[Tensor]] = {l: None for l in levels}
    for l, g in zip(used, grads):
        g = torch.zeros_like(leaves[l]) if g is None else g
        cams[l] = cam_from_gradient(features[l], g)[: crop[l][0], : crop[l][1]].detach().cpu()
    reader = "the box head" if kind == "roi" else "the dense head"
    notes = {l: f"not read by\n{reader}" for l in levels if cams[l] is None}
    return GradCAM(
        feats,
        cams,
        {l: strides[l] for l in levels},
        target,
        "two-stage" if kind == "roi" else "one-stage",
        (h, w),
        assigned,
        notes,
    )
