"""Interpolation fidelity of the study: how far an x2 upsampling of the teacher's
half-resolution features P^lr_l is from its full-resolution features P^hr_l, per pyramid level
(L1, relative L2, PSNR over the level's feature range, and the blur measure of :mod:`.blur`). Pure PyTorch down to
:func:`teacher_pyramids`, which runs the teacher on a Detectron2 data set: the half-size image is
made as stage 1 makes it (:class:`afigan.data.hr_lr_mapper.HRLRDatasetMapper`) and each G is called
as stage 1 calls it (:class:`afigan.engine.stage1.LevelwiseGenerator`).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Sequence, Tuple

import torch
from detectron2.data import build_detection_test_loader
from torch import nn
from torch.nn import functional as F

from afigan.config import lr_key
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.layers import crop_to_common, is_guided
from afigan.modeling.interpolator import LevelwiseGenerator, guided_levels, load_interpolator
from afigan.modeling.meta_arch import build_guide_model

from .blur import BlurSums

__all__ = [
    "Pyramid",
    "Interpolator",
    "ErrorSums",
    "fixed_x2",
    "interpolation_fidelity",
    "learned_x2",
    "teacher_pyramids",
]

Pyramid = Dict[str, torch.Tensor]
Interpolator = Callable[[Pyramid], Pyramid]  # half-resolution pyramid -> x2 predictions (levels it can predict)


@dataclass
class ErrorSums:
    """Running sums of one (interpolator, level) over every value of every image: a prediction
    and its target are compared on their common top-left window (as stage 1's content loss does)."""

    count: int = 0
    abs_err: float = 0.0
    sq_err: float = 0.0
    sq_target: float = 0.0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = crop_to_common(pred.double(), target.double())
        diff = pred - target
        self.count += diff.numel()
        self.abs_err += float(diff.abs().sum())
        self.sq_err += float(diff.pow(2).sum())
        self.sq_target += float(target.pow(2).sum())

    def scores(self, feature_range: float) -> Dict[str, float]:
        """``l1`` = mean |pred - target|; ``rel_l2`` = ||pred - target||_2 / ||target||_2;
        ``psnr`` = 10 log10(range^2 / MSE) in dB with ``feature_range`` = max - min of the level's
        target values over the set (inf for an exact prediction)."""
        mse = self.sq_err / self.count
        return {
            "l1": self.abs_err / self.count,
            "rel_l2": math.sqrt(self.sq_err / self.sq_target) if self.sq_target > 0 else math.nan,
            "psnr": math.inf if mse == 0 else 10.0 * math.log10(feature_range**2 / mse),
        }


def fixed_x2(mode: str, levels: Sequence[str]) -> Interpolator:
    """Fixed x2 interpolation (``"nearest"`` or ``"bilinear"``, align_corners False, as the necks'
    parameter-free kinds) of every level."""
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return lambda low: {l: F.interpolate(low[l], scale_factor=2.0, mode=mode, **kwargs) for l in levels}


def interpolation_fidelity(
    pyramids: Iterable[Tuple[Pyramid, Pyramid]], interpolators: Dict[str, Interpolator], levels: Sequence[str]
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{interpolator: {level: {"l1", "rel_l2", "psnr", "hf_l1", "hf_ratio", "values"}}}`` over ``pyramids``, pairs of
    (full-resolution target pyramid, half-resolution pyramid). The PSNR peak of a level is the
    range of its target values over all pairs, one for every interpolator. A level an
    interpolator does not predict (a guided kind's p2) is left out of its entry."""
    sums = {name: {l: ErrorSums() for l in levels} for name in interpolators}
    blur = {name: {l: BlurSums() for l in levels} for name in interpolators}
    lo = {l: math.inf for l in levels}
    hi = {l: -math.inf for l in levels}
    with torch.no_grad():
        for real, low in pyramids:
            for l in levels:
                lo[l], hi[l] = min(lo[l], float(real[l].min())), max(hi[l], float(real[l].max()))
            for name, fn in interpolators.items():
                for l, pred in fn(low).items():
                    sums[name][l].add(pred, real[l])
                    blur[name][l].add(pred, real[l])
    out = {}
    for name, per_level in sums.items():
        out[name] = {
            l: dict(s.scores(hi[l] - lo[l]), **blur[name][l].scores(), values=s.count)
            for l, s in per_level.items()
            if s.count
        }
    return out


def learned_x2(cfg, weights: str) -> Interpolator:
    """The upsampler of ``cfg`` (``MODEL.AFI.INTERP``/``SHARED``, its options) holding the
    interpolator tensors of ``weights`` (a stage-1 G or stage-2 AF extractor file), called on
    ``MODEL.AFI.LEVELS`` as stage 1 calls it: a guided kind gets the half-size pyramid's finer
    level as guide and predicts only the levels that have one."""
    g = load_interpolator(cfg, weights)
    levels = list(cfg.MODEL.AFI.LEVELS)
    one = next(iter(g.values())) if isinstance(g, nn.ModuleDict) else g
    guides = guided_levels(levels) if is_guided(one) else None
    run = LevelwiseGenerator(g).eval()
    if guides is None:
        return lambda low: run({l: low[l] for l in levels})
    return lambda low: run({l: low[l] for l in guides}, {l: low[f] for l, f in guides.items()})


def teacher_pyramids(cfg, dataset: str, max_images: int = 0) -> Iterable[Tuple[Pyramid, Pyramid]]:
    """(P^hr, P^lr) of the teacher ``MODEL.GUIDE_WEIGHTS`` for every image of ``dataset`` (the
    first ``max_images`` when > 0) at its test size, the half-size twin made by stage 1's mapper."""
    teacher = build_guide_model(cfg)
    loader = build_detection_test_loader(cfg, dataset, mapper=HRLRDatasetMapper(cfg, False))
    low_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
    for i, batch in enumerate(loader):
        if max_images and i >= max_images:
            break
        yield teacher(batch, "image"), teacher(batch, low_key)
