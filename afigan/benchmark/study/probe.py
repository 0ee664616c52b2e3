"""Part "probe" of the study: a detection probe with no training noise.

The study's stage-0 detector (the teacher's whole model, frozen) runs its own RPN and heads
(Detectron2's public ``proposal_generator``, ``roi_heads`` and ``detector_postprocess``) on
other pyramids of the same images, one *arm* each:

* ``full``: its own full-resolution pyramid (what its evaluation sees; the upper bound);
* ``nearest``, ``bilinear`` and each learned G: the half-size image's pyramid (the image made as
  stage 1 makes it, :class:`afigan.data.hr_lr_mapper.HRLRDatasetMapper`) upsampled x2 and fitted
  to the full-resolution level's size (cropped, or edge-padded by a pixel, bottom/right), with the
  full-resolution image's sizes. A guided kind gets the next finer half-size level as guide, as in
  stage 1; a level without one (p2) is upsampled bilinearly;
* ``half``: the half-size image's own pyramid at its own scale, no upsampler; its boxes and masks
  are rescaled to the original image by ``detector_postprocess`` (as any Detectron2 detector run on
  a smaller input).

Every arm sees the same images and the same detector, so the differences between upsamplers carry
no training-seed noise. Each arm's detections are matched to the ground truth once per image
(:mod:`.bootstrap`) and compared with bilinear by a paired bootstrap over the images. Detections are
cached per arm in ``OUTPUT/probe/<n>img/<arm>.json`` (keyed by the teacher's and G's file content
and the images), so a killed probe redoes only the arms it had not finished.
"""

import contextlib
import io
import itertools
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList
from pycocotools.coco import COCO
from torch.nn import functional as F

from afigan.checkpoint import AFICheckpointer
from afigan.config import load_config, lr_key
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.engine.detector import DetectorTrainer
from afigan.engine.stage_record import fingerprint
from afigan.layers import fit_to

from .bootstrap import coco_matching, paired_bootstrap
from .fidelity import fixed_x2, learned_x2
from .report import write_json
from .settings import ensure_probe_toy

__all__ = ["AFI_ARM", "FULL", "HALF", "REFERENCE", "load_detector", "probe_detections", "probe_scores", "upsampled_arm"]

FULL, HALF, REFERENCE = "full", "half", "bilinear"
# The second reference: is AFI's G (first seed) better than the other kinds' and its own variants'?
AFI_ARM = "afi"
TASKS = ("bbox", "segm")
Pyramid = Dict[str, torch.Tensor]
# An upsampling arm: half-size pyramid -> the levels it predicts at about twice their size.
Upsample = Callable[[Pyramid], Pyramid]


def load_detector(config_file: str, weights: str, opts: Sequence = ()):
    """(cfg, model): the detector of ``config_file`` (+ ``opts``) holding ``weights``, in eval mode."""
    cfg = load_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    model = DetectorTrainer.build_model(cfg)
    AFICheckpointer(model).load(weights)
    return cfg, model.eval()


def upsampled_arm(fn: Upsample) -> Callable[[Pyramid, Pyramid], Tuple[Pyramid, List[str]]]:
    """The features an upsampling arm gives the heads: every level of the full-resolution pyramid
    ``full`` made from ``low`` by ``fn`` (bilinear x2 for a level ``fn`` does not predict), fitted
    to the full-resolution level's size; also the levels that fell back to bilinear."""

    def features(low: Pyramid, full: Pyramid):
        up = fn(low)
        out, fallback = {}, []
        for level, target in full.items():
            if level not in up:
                fallback.append(level)
                x = F.interpolate(low[level], scale_factor=2.0, mode="bilinear", align_corners=False)
            else:
                x = up[level]
            out[level] = fit_to(x, target.shape[-2:])
        return out, fallback

    return features


def _heads(model, images: ImageList, features: Pyramid, batch: List[Dict]) -> List[Dict]:
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    out = []
    for r, x, size in zip(results, batch, images.image_sizes):
        r = detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))
        out += instances_to_coco_json(r.to("cpu"), x["image_id"])
    return out


def probe_detections(
    model, cfg, dataset: str, arms: Dict[str, Optional[Upsample]], max_images: int = 0
) -> Tuple[Dict[str, List[Dict]], Dict[str, List[str]], List[int]]:
    """Run the probe's ``arms`` (``FULL``, ``HALF`` or a name -> :data:`Upsample`) on the first
    ``max_images`` images of ``dataset`` (0: all). Returns ({arm: COCO results with the data set's
    category ids}, {arm: levels that fell back to bilinear}, image ids)."""
    loader = build_detection_test_loader(cfg, dataset, mapper=HRLRDatasetMapper(cfg, False))
    meta = MetadataCatalog.get(dataset)
    to_dataset_id = {v: k for k, v in getattr(meta, "thing_dataset_id_to_contiguous_id", {}).items()}
    low_key = lr_key("image", cfg.MODEL.AFI.SCALE_RATIO)
    feature_fns = {name: upsampled_arm(fn) for name, fn in arms.items() if fn is not None}
    dets = {name: [] for name in arms}
    fallback: Dict[str, List[str]] = {}
    ids = []
    batches = itertools.islice(loader, max_images) if max_images else loader
    with torch.no_grad():
        for batch in batches:
            ids += [x["image_id"] for x in batch]
            images = model.preprocess_image(batch)
            full = model.backbone(images.tensor)
            low_images = model.preprocess_image([{"image": x[low_key]} for x in batch])
            low = model.backbone(low_images.tensor)
            for name in arms:
                if name == FULL:
                    dets[name] += _heads(model, images, full, batch)
                elif name == HALF:
                    dets[name] += _heads(model, low_images, low, batch)
                else:
                    feats, fallback[name] = feature_fns[name](low, full)
                    dets[name] += _heads(model, images, feats, batch)
    for results in dets.values():
        for d in results:
            d["category_id"] = to_dataset_id.get(d["category_id"], d["category_id"])
    return dets, fallback, ids


def probe_scores(
    gt: COCO, dets: Dict[str, List[Dict]], image_ids: Sequence[int], resamples: int, seed: int = 0
) -> Dict[str, Dict]:
    """{task: {arm: {"ap", "diff", "ci", "resolved", "p_le_0"[, "vs_afi"]}}}: COCO AP of every arm
    on ``image_ids`` and its paired-bootstrap difference to bilinear
    (:func:`.bootstrap.paired_bootstrap`); with an ``afi`` arm, ``vs_afi`` holds the difference to
    it on the same resamples ({"diff", "ci", "resolved", "p_le_0"})."""
    out = {}
    for task in TASKS:
        matchings = {name: coco_matching(gt, d, task, image_ids) for name, d in dets.items()}
        ref = REFERENCE if REFERENCE in matchings else next(iter(matchings))
        out[task] = paired_bootstrap(matchings, ref, resamples, seed)
        if AFI_ARM in matchings and AFI_ARM != ref:
            versus = paired_bootstrap(matchings, AFI_ARM, resamples, seed)
            for name, e in out[task].items():
                e["vs_afi"] = {k: versus[name][k] for k in ("diff", "ci", "resolved", "p_le_0")}
    return out


def _teacher_config(runner) -> str:
    """The config the study's teacher was trained with (its run's config.yaml), else stage0.yaml."""
    run_yaml = os.path.join(runner.output_dir, "teacher", "stage0", "config.yaml")
    return run_yaml if os.path.isfile(run_yaml) else os.path.join(runner.settings.config_dir, "stage0.yaml")


def run_probe(runner, curves: Dict) -> Dict:
    """Part "probe" (see the module docstring) with the converged G of every curve arm of
    ``curves`` (the study.json section "curves"); returns the study.json section "probe"."""
    p = runner.settings.probe
    teacher = runner.ensure_teacher()
    if p.dataset.startswith("afigan_toy_probe"):
        ensure_probe_toy()
    if p.dataset not in DatasetCatalog.list():
        raise KeyError(
            f"--probe-dataset {p.dataset!r} is not a registered data set; give the name of one (e.g. "
            f"afigan_toy_probe_val, coco_2017_val)."
        )
    t0 = time.perf_counter()
    cfg, model = load_detector(_teacher_config(runner), teacher, runner.opts + ["DATASETS.TEST", f"('{p.dataset}',)"])
    levels = list(cfg.MODEL.AFI.LEVELS)
    arms: Dict[str, Optional[Upsample]] = {FULL: None, "nearest": fixed_x2("nearest", levels)}
    arms[REFERENCE] = fixed_x2("bilinear", levels)
    learned = {}
    for name, a in (curves.get("arms") or {}).items():
        if os.path.isfile(a["weights"]) and os.path.isfile(os.path.join(a["run_dir"], "config.yaml")):
            learned[name] = a
            arms[name] = learned_x2(load_config(os.path.join(a["run_dir"], "config.yaml")), a["weights"])
    arms[HALF] = None
    folder = os.path.join(runner.output_dir, "probe", f"{p.images or 'all'}img")
    teacher_fp = fingerprint(teacher)
    keys = {
        name: {
            "dataset": p.dataset,
            "images": p.images,
            "teacher": teacher_fp,
            "weights": fingerprint(learned[name]["weights"]) if name in learned else None,
        }
        for name in arms
    }
    cached = {name: _cached(os.path.join(folder, f"{name}.json"), keys[name]) for name in arms}
    todo = {name: fn for name, fn in arms.items() if cached[name] is None}
    ran, detect_s = [], 0.0
    if todo and not runner.report_only:
        runner.log(f"[study] probe: {len(todo)} arms ({', '.join(todo)}) on {p.dataset} ({p.images or 'all'} images)")
        t1 = time.perf_counter()
        dets, fallback, ids = probe_detections(model, cfg, p.dataset, todo, p.images)
        detect_s = time.perf_counter() - t1
        for name in todo:
            cached[name] = {"key": keys[name], "image_ids": ids, "fallback": fallback.get(name, []), "dets": dets[name]}
            write_json(os.path.join(folder, f"{name}.json"), cached[name])
        ran = list(todo)
    done = {name: c for name, c in cached.items() if c is not None}
    if not done:
        return {}
    ids = next(iter(done.values()))["image_ids"]
    gt = _coco(MetadataCatalog.get(p.dataset).json_file)
    t1 = time.perf_counter()
    scores = probe_scores(gt, {n: c["dets"] for n, c in done.items()}, ids, p.resamples, p.seed)
    score_s = time.perf_counter() - t1
    return {
        "dataset": p.dataset,
        "images": len(ids),
        "teacher": teacher,
        "resamples": p.resamples,
        "seed": p.seed,
        "reference": REFERENCE,
        "arms": list(done),
        "labels": {n: learned[n]["label"] if n in learned else n for n in done},
        "converged": {n: learned[n]["convergence"]["converged"] for n in done if n in learned},
        "fallback": {n: c["fallback"] for n, c in done.items() if c.get("fallback")},
        "ran": ran,
        "scores": scores,
        "wall_s": round(time.perf_counter() - t0, 1),
        "detect_wall_s": round(detect_s, 1),  # the arms run by this invocation
        "score_wall_s": round(score_s, 1),  # matching and bootstrap of every arm
    }


def _cached(path: str, key: Dict) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data if data.get("key") == key else None


def _coco(json_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return COCO(json_file)
