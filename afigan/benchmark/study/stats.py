"""Statistics of the study's detection runs: AP over seeds (mean, sample std, paired per-seed
differences with the reference arm, pooled seed noise) and AP on disjoint subsets of the test images
(how much the choice of images alone moves it)."""

import contextlib
import io
import json
import math
import statistics
from typing import Dict, List, Optional, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .settings import REFERENCE_ARM

__all__ = ["mean_std", "paired", "summarize", "seed_noise", "subset_ap", "mean_over_levels"]


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n"}``; ``std`` is the sample standard deviation (n - 1), None for n < 2."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict:
    """Per-seed differences ``a - b`` over the seeds both have: ``{"diffs": {seed: d}, "wins"
    (d > 0), "mean", "std", "n"}``."""
    seeds = sorted(set(a) & set(b))
    diffs = {s: a[s] - b[s] for s in seeds}
    return dict(mean_std(list(diffs.values())), diffs=diffs, wins=sum(d > 0 for d in diffs.values()))


def _finite_or(value, default):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def summarize(detection: Dict[str, Dict[int, Dict]]) -> Dict:
    """Per arm and task (bbox, segm): AP per seed, mean/std, and the paired difference with nearest."""
    out = {}
    for arm, by_seed in detection.items():
        entry = {}
        for task in ("bbox", "segm"):
            # Detectron2 reports AP NaN when a model detects nothing at all: that is AP 0. (APs is
            # NaN also when the set has no small object, so a NaN APs is left out instead.)
            ap = {seed: _finite_or(r[task]["AP"], 0.0) for seed, r in by_seed.items() if task in r}
            aps = {
                seed: float(r[task]["APs"])
                for seed, r in by_seed.items()
                if task in r and _finite_or(r[task].get("APs"), None) is not None
            }
            entry[task] = {"per_seed": ap, "AP": mean_std(list(ap.values())), "APs": mean_std(list(aps.values()))}
        out[arm] = entry
    if REFERENCE_ARM in out:
        for arm, entry in out.items():
            if arm != REFERENCE_ARM:
                for task in ("bbox", "segm"):
                    entry[task]["vs_" + REFERENCE_ARM] = paired(
                        entry[task]["per_seed"], out[REFERENCE_ARM][task]["per_seed"]
                    )
    return out


def seed_noise(summary: Dict) -> Dict[str, Optional[float]]:
    """Per task, the pooled seed-to-seed standard deviation of AP (root of the mean variance over
    the arms with two or more seeds): the size a difference between arms must clearly exceed."""
    out = {}
    for task in ("bbox", "segm"):
        var = [e[task]["AP"]["std"] ** 2 for e in summary.values() if e[task]["AP"]["std"] is not None]
        out[task] = math.sqrt(sum(var) / len(var)) if var else None
    return out


def subset_ap(gt_json: str, results_json: str, parts: int = 4, iou_type: str = "bbox") -> List[float]:
    """COCO AP (x100) of one model's saved detections on ``parts`` disjoint, interleaved subsets of
    the evaluated images: how much the choice of images alone moves AP on a set 1/parts the size."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(gt_json)
        with open(results_json) as f:
            dets = [d for d in json.load(f) if iou_type != "segm" or "segmentation" in d]
        res = gt.loadRes(dets) if dets else None
        ids = sorted(gt.getImgIds())
        out = []
        for k in range(parts):
            if res is None:
                out.append(0.0)
                continue
            e = COCOeval(gt, res, iou_type)
            e.params.imgIds = ids[k::parts]
            e.evaluate()
            e.accumulate()
            e.summarize()
            out.append(max(0.0, float(e.stats[0])) * 100)
    return out


def mean_over_levels(scores: Dict[str, Dict[str, float]], metric: str, reference: Optional[Dict] = None) -> float:
    """Mean over the levels in ``scores`` of ``metric``, or of its ratio to ``reference``'s (when given)."""
    # float(): study.json stores inf and nan as strings.
    vals = [
        float(m[metric]) / float(reference[l][metric]) if reference else float(m[metric])
        for l, m in scores.items()
        if math.isfinite(float(m[metric])) and (not reference or float(reference[l][metric]))
    ]
    return sum(vals) / len(vals) if vals else math.nan
