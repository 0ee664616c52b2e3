"""Compare an exported detector's detections with the PyTorch model's as matched sets, not list
positions: a randomly initialised (or weakly trained) model has many near-tied scores, and the same
detections then come out of the two runtimes in different orders.

Matching is **greedy by score** (as COCO evaluation matches): PyTorch's detections in decreasing
score order each take the not yet matched exported detection of the same class with the highest
box IoU, if that IoU is at least :data:`MATCH_IOU`. Matched pairs are compared (box corners in px,
score, mask probabilities, any other per-detection output); a detection left without partner is
acceptable only when it sits at a cut the other runtime may have drawn a hair differently: its
score within :data:`CUT_EPSILON` of the score threshold, or, when the other list is full (top-k
detections), at most :data:`CUT_EPSILON` above that list's lowest score.

Pure tensors: a detection list is a ``{name: tensor}`` dict of one image's flattened outputs
(``pred_boxes`` (N, 4) XYXY, ``scores`` (N,), ``pred_classes`` (N,), optionally ``pred_masks``
(N, 1, M, M) probabilities or (N, H, W), and any other (N, ...) output).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "MATCH_IOU",
    "BOX_TOLERANCE_PX",
    "SCORE_TOLERANCE",
    "MASK_TOLERANCE",
    "CUT_EPSILON",
    "TOLERANCES",
    "SizeCheck",
    "box_iou",
    "match_detections",
    "merge_checks",
    "worst_differences",
    "size_table",
]

# Two detections of one class are the same one when their boxes overlap at least this much
# (Detectron2's NMS keeps same-class boxes of one list below IoU 0.5, so the partner is unique).
MATCH_IOU = 0.5
# Largest allowed |difference| of a matched pair's box corners, in pixels. Float rounding between
# runtimes moves boxes by ~1e-3 px at 100-800 px (8e-3 px measured for FADE on unscaled inputs);
# a real error (a half-pixel shift, a wrong crop) moves them by 0.5 px and more.
BOX_TOLERANCE_PX = 0.05
# Largest allowed |difference| of a matched pair's scores (probabilities); other per-detection
# outputs (e.g. CenterMask's mask_scores) get it too, relative to max(1, |value|).
SCORE_TOLERANCE = 1e-4
# Largest allowed mean |difference| of a matched pair's mask probabilities (for bool masks:
# the fraction of pixels that differ).
MASK_TOLERANCE = 1e-3
# How close to a cut (score threshold, top-k) an unmatched detection's score must be to count as
# a near-tie the two runtimes broke differently: ten times the score tolerance.
CUT_EPSILON = 1e-3

TOLERANCES = {
    "match_iou": MATCH_IOU,
    "box_px": BOX_TOLERANCE_PX,
    "score": SCORE_TOLERANCE,
    "mask_mean_abs": MASK_TOLERANCE,
    "cut_epsilon": CUT_EPSILON,
}

_MAIN = ("pred_boxes", "scores", "pred_classes", "pred_masks")


@dataclass
class SizeCheck:
    """One image size's comparison: how many detections each runtime gave, how many matched,
    the largest differences of matched pairs (``None`` where nothing was compared), the unmatched
    detections (``{"runtime", "class", "score", "box", "near_cut"}``), and the problems found
    (sentences; empty means ``ok``)."""

    size: Tuple[int, int]
    image: str = ""
    pytorch: int = 0
    exported: int = 0
    matched: int = 0
    box_px: Optional[float] = None
    score: Optional[float] = None
    mask: Optional[float] = None
    other: Dict[str, float] = field(default_factory=dict)
    unmatched: List[dict] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        """``HxW``, or ``mixed`` for a batch of images of different sizes (``image`` says which)."""
        return "mixed" if self.image.startswith("mixed sizes") else f"{self.size[0]}x{self.size[1]}"

    def to_dict(self) -> dict:
        """JSON-ready, with ``ok``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["size"] = list(self.size)
        d["ok"] = self.ok
        return d


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) XYXY boxes -> (N, M) IoU (0 where a union is empty)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _greedy_match(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> List[Tuple[int, int]]:
    """(i, j) pairs: PyTorch detection i (decreasing score) with exported detection j."""
    eb, ab = expected["pred_boxes"].double(), actual["pred_boxes"].double()
    if not len(eb) or not len(ab):
        return []
    iou = box_iou(eb, ab)
    # A zero-area box (clipped to the image border; random weights make many) has IoU 0 with every
    # box, its own copy included: boxes equal to within the box tolerance count as IoU 1.
    equal = (eb[:, None, :] - ab[None, :, :]).abs().amax(-1) <= BOX_TOLERANCE_PX
    iou = torch.where(equal, torch.ones_like(iou), iou)
    same = expected["pred_classes"].long()[:, None] == actual["pred_classes"].long()[None, :]
    iou = torch.where(same, iou, torch.full_like(iou, -1.0))
    # Among equal IoUs (duplicated boxes) the closest score wins; the 1e-9 weight never outranks
    # a real IoU difference.
    closeness = -(expected["scores"].double()[:, None] - actual["scores"].double()[None, :]).abs()
    key = iou + 1e-9 * closeness
    taken = torch.zeros(len(ab), dtype=torch.bool)
    pairs = []
    for i in torch.argsort(expected["scores"], descending=True, stable=True).tolist():
        row = key[i].masked_fill(taken, -2.0)
        j = int(row.argmax())
        if iou[i, j] >= MATCH_IOU and not taken[j]:
            taken[j] = True
            pairs.append((i, j))
    return pairs


def _near_cut(score: float, other_scores: torch.Tensor, threshold: Optional[float], topk: Optional[int]) -> bool:
    if threshold is not None and abs(score - threshold) <= CUT_EPSILON:
        return True
    return bool(topk) and len(other_scores) >= topk and score <= float(other_scores.min()) + CUT_EPSILON


def _relative(e: torch.Tensor, a: torch.Tensor) -> float:
    if not e.numel():
        return 0.0
    return float(((a.double() - e.double()).abs() / e.double().abs().clamp(min=1.0)).max())


def match_detections(
    expected: Dict[str, torch.Tensor],
    actual: Dict[str, torch.Tensor],
    *,
    size: Tuple[int, int] = (0, 0),
    image: str = "",
    score_threshold: Optional[float] = None,
    topk: Optional[int] = None,
) -> SizeCheck:
    """Match PyTorch's detections (``expected``) with the exported model's (``actual``) one-to-one
    (see the module docstring) and judge them with the tolerances of this module.

    ``score_threshold``: the model's test score threshold in the scale of ``scores`` (None: no
    threshold cut to be near); ``topk``: its detections-per-image limit (None: no top-k cut)."""
    check = SizeCheck(size=tuple(int(s) for s in size), image=image)
    for name, d in (("PyTorch", expected), ("exported", actual)):
        missing = [k for k in ("pred_boxes", "scores", "pred_classes") if k not in d]
        if missing:
            raise ValueError(f"The {name} detections lack {missing}; they have {sorted(d)}.")
    check.pytorch, check.exported = len(expected["scores"]), len(actual["scores"])
    pairs = _greedy_match(expected, actual)
    check.matched = len(pairs)
    if pairs:
        i = torch.tensor([p[0] for p in pairs])
        j = torch.tensor([p[1] for p in pairs])
        box = (expected["pred_boxes"][i].double() - actual["pred_boxes"][j].double()).abs()
        check.box_px = float(box.max())
        check.score = float((expected["scores"][i].double() - actual["scores"][j].double()).abs().max())
        if "pred_masks" in expected and "pred_masks" in actual:
            em, am = expected["pred_masks"][i].double(), actual["pred_masks"][j].double()
            check.mask = float((em - am).abs().flatten(1).mean(1).max())
        for k in sorted(set(expected) & set(actual) - set(_MAIN)):
            e, a = expected[k], actual[k]
            if e.dim() and a.dim() and len(e) == check.pytorch and len(a) == check.exported:
                check.other[k] = _relative(e[i], a[j])
        if check.box_px > BOX_TOLERANCE_PX:
            check.problems.append(f"a matched box differs by {check.box_px:.3g} px (> {BOX_TOLERANCE_PX:g})")
        if check.score > SCORE_TOLERANCE:
            check.problems.append(f"a matched score differs by {check.score:.3g} (> {SCORE_TOLERANCE:g})")
        if check.mask is not None and check.mask > MASK_TOLERANCE:
            check.problems.append(
                f"a matched mask differs by {check.mask:.3g} mean |difference| (> {MASK_TOLERANCE:g})"
            )
        for k, v in check.other.items():
            if v > SCORE_TOLERANCE:
                check.problems.append(f"matched {k} differ by {v:.3g} (> {SCORE_TOLERANCE:g})")
    if ("pred_masks" in expected) != ("pred_masks" in actual):
        check.problems.append("only one of the two runtimes returns pred_masks")
    matched = {"PyTorch": {p[0] for p in pairs}, "exported": {p[1] for p in pairs}}
    for runtime, own, other in (("PyTorch", expected, actual), ("exported", actual, expected)):
        for n in range(len(own["scores"])):
            if n in matched[runtime]:
                continue
            score = float(own["scores"][n])
            near = _near_cut(score, other["scores"], score_threshold, topk)
            check.unmatched.append(
                {
                    "runtime": runtime,
                    "class": int(own["pred_classes"][n]),
                    "score": score,
                    "box": [round(float(x), 2) for x in own["pred_boxes"][n]],
                    "near_cut": near,
                }
            )
            if not near:
                check.problems.append(
                    f"{runtime} detection of class {int(own['pred_classes'][n])} with score {score:.4g} has no "
                    f"partner and is not within {CUT_EPSILON:g} of a cut"
                )
    return check


def merge_checks(checks: Sequence[SizeCheck]) -> SizeCheck:
    """The checks of the images of one batch (one size) as one: counts summed, differences the
    largest, unmatched detections and problems of image i > 0 prefixed "image i:"."""
    if len(checks) == 1:
        return checks[0]
    out = SizeCheck(size=checks[0].size, image=checks[0].image)
    for i, c in enumerate(checks):
        out.pytorch, out.exported, out.matched = (
            out.pytorch + c.pytorch,
            out.exported + c.exported,
            out.matched + c.matched,
        )
        for key in ("box_px", "score", "mask"):
            values = [v for v in (getattr(out, key), getattr(c, key)) if v is not None]
            setattr(out, key, max(values) if values else None)
        for k, v in c.other.items():
            out.other[k] = max(out.other.get(k, 0.0), v)
        out.unmatched += [{**u, "image": i} for u in c.unmatched]
        out.problems += [f"image {i}: {p}" for p in c.problems]
    return out


def worst_differences(checks: Sequence[SizeCheck]) -> Dict[str, float]:
    """The largest matched box (px), score and mask differences over ``checks`` (a key only where
    something was compared)."""
    out = {}
    for key in ("box_px", "score", "mask"):
        values = [getattr(c, key) for c in checks if getattr(c, key) is not None]
        if values:
            out[key] = max(values)
    return out


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2g}"


def size_table(checks: Sequence[SizeCheck]) -> str:
    """A plain-text table, one row per size: image, detections in each runtime, matched, largest
    matched box/score/mask difference, unmatched (of them near a cut), verdict."""
    head = ("size", "PyTorch", "exported", "matched", "box px", "score", "mask", "unmatched (near cut)", "verdict")
    head += ("image",)
    rows = [head]
    for c in checks:
        near = sum(u["near_cut"] for u in c.unmatched)
        rows.append(
            (
                c.label,
                str(c.pytorch),
                str(c.exported),
                str(c.matched),
                _fmt(c.box_px),
                _fmt(c.score),
                _fmt(c.mask),
                f"{len(c.unmatched)} ({near})",
                "ok" if c.ok else "DIFFERENT",
                c.image,
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
