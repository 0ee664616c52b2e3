"""COCO AP from per-image matching, and a paired bootstrap over images of the AP difference
between two detectors evaluated on the same images.

The method: COCOeval matches each image once (:func:`coco_matching`: pycocotools' ``evaluateImg``,
area range "all", at most ``maxDets[-1]`` = 100 detections per image, per category and IoU
threshold 0.50:0.05:0.95), and the matching is kept as, per category, every detection's score,
image and TP/FP flag per IoU threshold, and every image's count of non-ignored ground truths.
:func:`average_precision` recomputes COCO AP from those lists exactly as ``COCOeval.accumulate``
and ``summarize`` do (detections ranked by score with a stable sort, precision made monotone,
read at the 101 recall thresholds, averaged over thresholds and categories with ground truth), with
an optional weight per image: an image drawn k times by a resample counts k times (its
detections' TP/FP and its ground truths), which equals COCOeval on a data set holding k copies of
it. :func:`paired_bootstrap` draws ``resamples`` sets of n images with replacement (one fixed
seed; the same draws for every arm, so the comparison is paired), recomputes every arm's AP on
each, and reports the 2.5th and 97.5th percentiles of the difference to the reference arm (a
percentile interval): a difference is "resolved" when that 95 % interval excludes 0.
"""

import contextlib
import io
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["CategoryMatch", "Matching", "coco_matching", "average_precision", "bootstrap_weights", "paired_bootstrap"]

RESAMPLES = 1000
CI = 0.95


@dataclass
class CategoryMatch:
    """One category's matching over the images: ``scores`` (D,), ``image`` (D,) index into the
    matching's ``image_ids``, ``tp`` and ``fp`` (T, D) bool per IoU threshold (a detection matched
    to an ignored ground truth is neither), in the order COCOeval concatenates them (by image, then
    by score within an image); ``gt`` (n_images,) non-ignored ground truths per image."""

    scores: np.ndarray
    image: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gt: np.ndarray


@dataclass
class Matching:
    """Per-image matching of one detector's detections on ``image_ids`` (see the module docstring)."""

    image_ids: List[int]
    categories: Dict[int, CategoryMatch] = field(default_factory=dict)
    rec_thrs: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101))


def coco_matching(gt: COCO, detections: Sequence[Dict], iou_type: str, image_ids: Sequence[int]) -> Matching:
    """Match ``detections`` (COCO results: image_id, category_id, score, bbox and/or segmentation)
    to the ground truth of ``gt`` on ``image_ids``, once, with pycocotools (``iou_type``: "bbox" or
    "segm"; for "segm" a result's ``bbox`` is dropped, as Detectron2's COCOEvaluator does, so
    pycocotools reads the mask)."""
    ids = sorted(set(int(i) for i in image_ids))
    dets = [d for d in detections if int(d["image_id"]) in set(ids)]
    if iou_type == "segm":
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets if "segmentation" in d]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        res = gt.loadRes(dets) if dets else COCO()
        if not dets:
            res.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
            res.createIndex()
        e = COCOeval(gt, res, iou_type)
        e.params.imgIds = ids
        e.params.areaRng, e.params.areaRngLbl = [e.params.areaRng[0]], ["all"]
        e.evaluate()
    max_det = e.params.maxDets[-1]
    n_img, t = len(e.params.imgIds), len(e.params.iouThrs)
    out = Matching(image_ids=list(e.params.imgIds), rec_thrs=np.asarray(e.params.recThrs))
    for k, cat in enumerate(e.params.catIds):
        scores, image, tp, fp, gts = [], [], [], [], np.zeros(n_img, dtype=np.int64)
        for i in range(n_img):
            ev = e.evalImgs[k * n_img + i]  # one area range: index k * A * I + i with A = 1
            if ev is None:
                continue
            gts[i] = int(np.count_nonzero(np.asarray(ev["gtIgnore"]) == 0))
            s = np.asarray(ev["dtScores"][:max_det], dtype=float)
            m = np.asarray(ev["dtMatches"])[:, :max_det]
            ig = np.asarray(ev["dtIgnore"])[:, :max_det].astype(bool)
            scores.append(s)
            image.append(np.full(len(s), i))
            tp.append(np.logical_and(m > 0, ~ig))
            fp.append(np.logical_and(m == 0, ~ig))
        if not scores:  # the category has neither ground truth nor detections on these images
            scores, image = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
            tp = fp = [np.zeros((t, 0), bool)]
        out.categories[int(cat)] = CategoryMatch(
            scores=np.concatenate(scores),
            image=np.concatenate(image).astype(np.int64),
            tp=np.concatenate(tp, axis=1),
            fp=np.concatenate(fp, axis=1),
            gt=gts,
        )
    return out


def _category_precision(c: CategoryMatch, weights: np.ndarray, rec_thrs: np.ndarray) -> Optional[np.ndarray]:
    """(B, T, R) interpolated precision of one category under B image weightings ((B, n_images));
    None for a weighting without ground truth of the category (COCOeval leaves such a category
    out); the caller masks those rows."""
    order = np.argsort(-c.scores, kind="mergesort")  # COCOeval's rank: stable, by score
    w = weights[:, c.image[order]]  # (B, D)
    tp = np.cumsum(c.tp[None, :, order] * w[:, None, :], axis=2)  # (B, T, D)
    fp = np.cumsum(c.fp[None, :, order] * w[:, None, :], axis=2)
    npig = weights @ c.gt  # (B,)
    b, t, d = tp.shape
    q = np.zeros((b, t, len(rec_thrs)))
    if d == 0:
        return q
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = tp / npig[:, None, None]
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.flip(np.maximum.accumulate(np.flip(pr, axis=2), axis=2), axis=2)  # monotone envelope
    for i in range(b):
        if npig[i] == 0:
            continue
        for j in range(t):
            inds = np.searchsorted(rc[i, j], rec_thrs, side="left")
            ok = inds < d
            q[i, j, ok] = pr[i, j, inds[ok]]
    return q


def average_precision(m: Matching, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """COCO AP x 100 (COCOeval's stats[0]: IoU 0.50:0.95, area all, 100 detections) of a matching,
    for each row of ``weights`` ((B, n_images) counts per image; None: every image once, B = 1).
    Returns (B,); NaN for a weighting with no ground truth at all."""
    w = np.ones((1, len(m.image_ids))) if weights is None else np.asarray(weights, dtype=float)
    total = np.zeros(w.shape[0])
    count = np.zeros(w.shape[0])
    for c in m.categories.values():
        q = _category_precision(c, w, m.rec_thrs)
        has = (w @ c.gt) > 0
        total += np.where(has, q.mean(axis=(1, 2)), 0.0)
        count += has
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * total / count


def bootstrap_weights(n_images: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_images): how often each image is drawn in each resample of n images drawn
    with replacement (numpy's default_rng(seed))."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(resamples, n_images))
    return np.stack([np.bincount(row, minlength=n_images) for row in draws]).astype(float)


def paired_bootstrap(
    matchings: Dict[str, Matching], reference: str, resamples: int = RESAMPLES, seed: int = 0, chunk: int = 100
) -> Dict[str, Dict]:
    """Per arm: ``ap`` (all images once), ``diff`` (ap - reference's), ``ci`` (the 95 % percentile
    interval of the difference over ``resamples`` paired image resamples), ``resolved`` (the
    interval excludes 0) and ``p_le_0`` (share of resamples where the arm is not above the
    reference). Every matching must cover the same images in the same order."""
    ids = matchings[reference].image_ids
    for name, m in matchings.items():
        if m.image_ids != ids:
            raise ValueError(f"paired_bootstrap: arm {name!r} was matched on other images than {reference!r}.")
    weights = bootstrap_weights(len(ids), resamples, seed)
    boot = {}
    for name, m in matchings.items():
        boot[name] = np.concatenate([average_precision(m, weights[i : i + chunk]) for i in range(0, resamples, chunk)])
    lo, hi = 100 * (1 - CI) / 2, 100 * (1 + CI) / 2
    out = {}
    for name, m in matchings.items():
        ap = float(average_precision(m)[0])
        diff = boot[name] - boot[reference]
        ci = [float(np.nanpercentile(diff, lo)), float(np.nanpercentile(diff, hi))]
        out[name] = {
            "ap": ap,
            "diff": ap - float(average_precision(matchings[reference])[0]),
            "ci": ci,
            "resolved": bool(ci[0] > 0 or ci[1] < 0),
            "p_le_0": float(np.mean(diff <= 0)),
        }
    return out
