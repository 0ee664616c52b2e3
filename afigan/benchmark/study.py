"""The study of ``tools/study.py``: does the AF interpolator do what AFI-GAN promises?

Three questions, asked on one data set with one teacher (README, "What we measured"):

* **Interpolation fidelity**: on held-out images (``DATASETS.TEST``), per pyramid level, how far
  the x2 upsampling of the teacher's half-resolution features P^lr_l is from its full-resolution
  features P^hr_l, for nearest, bilinear, every stage-1 G and every stage-2 interpolator of the
  study (:func:`interpolation_fidelity`: L1, relative L2 and PSNR over the level's feature range).
  The half-size image is made as stage 1 makes it (:class:`afigan.data.hr_lr_mapper.HRLRDatasetMapper`)
  and each G is called as stage 1 calls it (:class:`afigan.engine.stage1.LevelwiseGenerator`).
* **Detection**: stage-3 COCO bbox/segm AP of one detector config whose only difference is the
  upsampler (:data:`ARMS`: nearest, bilinear, AFI from the whole progressive chain, AFI trained
  by stage 3 alone from random init, DySample, CARAFE, FADE), each for several ``SEED`` values at
  one stage-3 budget; mean, sample standard deviation and a paired per-seed comparison with nearest.
* **Ablations** (:data:`ABLATIONS`): stage 1 with the reference's detached adversarial term
  (``MODEL.AFI.ADV_GRAD_TO_G False``) and with one interpolator per level (``MODEL.AFI.SHARED
  False``), compared with the chain's own stage 1 by content loss and fidelity.

One teacher (stage 0) serves every run, and one stage-1/2 chain per learned kind serves all of
its stage-3 seeds: the seeds vary stage 3 only. Every run goes through the pipeline's own stage
runner (:class:`afigan.engine.pipeline.Pipeline`, wiring from the stage table), is skipped when
finished (stages 0-2: their final checkpoints; stage 3: its ``results.json``) and resumes from its
last checkpoint when interrupted. ``study.json`` records every run's config, overrides, seed and
wall time as it goes; ``study.md``, ``fidelity.png`` and ``detection.png`` are written at the end.
"""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.nn import functional as F

from afigan.analysis.feature_figures import load_interpolator
from afigan.analysis.metrics import read_metrics
from afigan.config import lr_key
from afigan.data.datasets import register_toy_dataset, toy_root
from afigan.data.hr_lr_mapper import HRLRDatasetMapper
from afigan.data.toy_shapes import make_toy_dataset, toy_dataset_ready
from afigan.engine.cli import eval_only
from afigan.engine.common import load_cfg
from afigan.engine.pipeline import Pipeline
from afigan.engine.stage1 import LevelwiseGenerator, guided_levels
from afigan.engine.stages import final_files
from afigan.layers import crop_to_common, is_guided
from afigan.modeling.meta_arch import build_guide_model

__all__ = [
    "ErrorSums",
    "fixed_x2",
    "interpolation_fidelity",
    "mean_std",
    "paired",
    "Arm",
    "ARMS",
    "ABLATIONS",
    "StudySettings",
    "QUICK",
    "FULL",
    "STUDY_TOY",
    "ensure_study_toy",
    "run_study",
    "write_outputs",
    "format_markdown",
]

# --------------------------------------------------------------------------------------------
# Fidelity: pure PyTorch, no Detectron2 needed below this line until the teacher is built.
# --------------------------------------------------------------------------------------------

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
    """``{interpolator: {level: {"l1", "rel_l2", "psnr", "values"}}}`` over ``pyramids``, pairs of
    (full-resolution target pyramid, half-resolution pyramid). The PSNR peak of a level is the
    range of its target values over all pairs, one for every interpolator. A level an
    interpolator does not predict (a guided kind's p2) is left out of its entry."""
    sums = {name: {l: ErrorSums() for l in levels} for name in interpolators}
    lo = {l: math.inf for l in levels}
    hi = {l: -math.inf for l in levels}
    with torch.no_grad():
        for real, low in pyramids:
            for l in levels:
                lo[l], hi[l] = min(lo[l], float(real[l].min())), max(hi[l], float(real[l].max()))
            for name, fn in interpolators.items():
                for l, pred in fn(low).items():
                    sums[name][l].add(pred, real[l])
    out = {}
    for name, per_level in sums.items():
        out[name] = {l: dict(s.scores(hi[l] - lo[l]), values=s.count) for l, s in per_level.items() if s.count}
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


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# What is run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One detector of the detection comparison. ``chain``: the learned kind whose stage-1/2 chain
    (config set ``<config-dir>`` for afi, ``<config-dir>_<kind>`` otherwise) trains the
    interpolator that stage 3 starts from; None: stage 3 alone from ``<config-dir>/stage3.yaml``
    with ``MODEL.AFI.INTERP interp`` (a fixed kind, or a learned one from random init)."""

    chain: Optional[str] = None
    interp: str = ""
    label: str = ""


ARMS: Dict[str, Arm] = {
    "nearest": Arm(interp="nearest", label="nearest"),
    "bilinear": Arm(interp="bilinear", label="bilinear"),
    "afi": Arm(chain="afi", label="AFI, progressive (stages 1-2-3)"),
    "afi_stage3_only": Arm(interp="afi", label="AFI, stage 3 only (random init)"),
    "dysample": Arm(chain="dysample", label="DySample, progressive"),
    "carafe": Arm(chain="carafe", label="CARAFE, progressive"),
    "fade": Arm(chain="fade", label="FADE, progressive"),
}
REFERENCE_ARM = "nearest"

# name -> (the chain whose stage 1 is varied, what the variant is, its overrides)
ABLATIONS: Dict[str, Tuple[str, str, List[str]]] = {
    "adv": ("afi", "adversarial term detached from G (reference, B1)", ["MODEL.AFI.ADV_GRAD_TO_G", "False"]),
    "shared": ("afi", "one interpolator per level", ["MODEL.AFI.SHARED", "False"]),
}
ABLATION_RUN = {"adv": "afi_adv_detached", "shared": "afi_per_level"}

STUDY_TOY = "afigan_toy_study"
# The study's toy set: the package's generator with 64 validation images instead of 16 (the
# training split is the same 48 images); 16 images (~40 objects) made one evaluation's AP move
# by points from the choice of images alone.
STUDY_TOY_VAL = 64


@dataclass
class StudySettings:
    kinds: Tuple[str, ...]
    seeds: Tuple[int, ...]
    ablations: Tuple[str, ...]
    # SOLVER.MAX_ITER of stage 0, 1, 2, 3 (0: the YAML's); the YAML's schedule is compressed to it.
    max_iter: Tuple[int, int, int, int] = (200, 60, 60, 240)
    config_dir: str = "configs/toy/pipeline"
    dataset_train: str = STUDY_TOY + "_train"
    dataset_test: str = STUDY_TOY + "_val"
    fidelity_images: int = 0  # 0: all of dataset_test
    opts: List[str] = field(default_factory=list)


QUICK = StudySettings(kinds=("nearest", "bilinear", "afi", "afi_stage3_only"), seeds=(0,), ablations=("adv",))
FULL = StudySettings(
    kinds=("nearest", "bilinear", "afi", "afi_stage3_only", "dysample", "carafe"),
    seeds=(0, 1, 2),
    ablations=("adv", "shared"),
)


def ensure_study_toy() -> str:
    """Write (once) and register the study's toy set ``afigan_toy_study_{train,val}``; returns its root."""
    root = toy_root() + "_study"
    if not toy_dataset_ready(root):
        make_toy_dataset(root, num_val=STUDY_TOY_VAL)
    register_toy_dataset(root, prefix=STUDY_TOY)
    return root


def _config_set(settings: StudySettings, kind: str) -> str:
    return settings.config_dir if kind == "afi" else f"{settings.config_dir.rstrip('/')}_{kind}"


def _budget(config_file: str, iters: int, opts: Sequence[str]) -> List[str]:
    """Overrides that compress the YAML's schedule (steps and warm-up scaled alike) to ``iters``."""
    if iters <= 0:
        return []
    solver = load_cfg(argparse.Namespace(config_file=config_file, opts=list(opts))).SOLVER
    scale = iters / solver.MAX_ITER
    # fvcore's schedule wants every step before the last iteration; a budget that short keeps none.
    steps = tuple(sorted({max(1, round(s * scale)) for s in solver.STEPS if round(s * scale) < iters}))
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        str(steps),
        "SOLVER.WARMUP_ITERS",
        str(max(1, round(solver.WARMUP_ITERS * scale))),
    ]


class _Chain(Pipeline):
    """A config set's pipeline whose stages get the study's budget on top of the stage table's
    wiring (its overrides come last, so they win over the YAML)."""

    def __init__(self, config_dir, output_dir, args, opts, budgets: Dict[str, List[str]]):
        super().__init__(config_dir, output_dir, args, opts)
        self.budgets = budgets

    def overrides(self, stage: str) -> List[str]:
        return super().overrides(stage) + self.budgets.get(stage, [])


def _eval_stage(stage: str, args):
    return eval_only(args)


class StudyRunner:
    """Runs (or skips) every training of a study in ``output_dir`` and records it in ``study.json``."""

    def __init__(self, settings: StudySettings, output_dir: str, args, log=print, report_only: bool = False):
        unknown = [k for k in settings.kinds if k not in ARMS]
        if unknown:
            raise ValueError(f"--kinds: {unknown[0]!r} is not a study arm; choose from {', '.join(ARMS)}.")
        unknown = [a for a in settings.ablations if a not in ABLATIONS]
        if unknown:
            raise ValueError(f"--ablations: {unknown[0]!r} is not an ablation; choose from {', '.join(ABLATIONS)}.")
        if not settings.seeds:
            raise ValueError("--seeds: give at least one seed.")
        for kind in self._chains(settings):
            if not os.path.isdir(_config_set(settings, kind)):
                raise FileNotFoundError(
                    f"The {kind} chain needs the config set {_config_set(settings, kind)!r} "
                    f"(stage1.yaml, stage2.yaml, stage3.yaml); make it, or leave {kind} out of "
                    f"--kinds and --ablations."
                )
        if STUDY_TOY in (settings.dataset_train + settings.dataset_test) and args.num_gpus * args.num_machines > 1:
            raise ValueError(
                f"The study's toy set {STUDY_TOY!r} is registered in this process only; with --num-gpus "
                f"give data sets registered on import (--dataset-train afigan_toy_train --dataset-test "
                f"afigan_toy_val, or COCO's)."
            )
        self.settings, self.output_dir, self.args, self.log = settings, output_dir, args, log
        self.report_only = report_only
        self.json_path = os.path.join(output_dir, "study.json")
        self.previous = {}
        if os.path.isfile(self.json_path):
            with open(self.json_path) as f:
                self.previous = {r["name"]: r for r in json.load(f).get("runs", [])}
        self.runs: List[Dict] = []
        data = ["DATASETS.TRAIN", f"('{settings.dataset_train}',)", "DATASETS.TEST", f"('{settings.dataset_test}',)"]
        self.opts = data + list(settings.opts)

    @staticmethod
    def _chains(settings: StudySettings) -> List[str]:
        kinds = {ARMS[k].chain for k in settings.kinds if ARMS[k].chain}
        kinds |= {ABLATIONS[a][0] for a in settings.ablations}
        return sorted(kinds)

    # ---- one run ----
    def _record(
        self,
        name: str,
        stage: str,
        config_file: str,
        run_dir: str,
        opts: List[str],
        fn: Callable[[], Dict],
        done: Callable[[], bool],
    ) -> Dict:
        record = {
            "name": name,
            "stage": stage,
            "config_file": config_file,
            "output_dir": run_dir,
            "opts": [str(o) for o in opts],
        }
        before = self.previous.get(name)
        if done():
            if before is not None and before.get("opts") != record["opts"]:
                raise ValueError(
                    f"{run_dir!r} holds a finished run made with other settings (see {self.json_path}); "
                    f"give another --output-dir or the same settings as before."
                )
            record.update(status="skipped, already done", wall_s=(before or {}).get("wall_s"))
            self.log(f"[study] {name}: skipped, already done ({run_dir})")
            result = None
        elif self.report_only:
            # Tables of what is finished (an interrupted or unfinished study): nothing is trained.
            record.update(status="not run (--report-only)", wall_s=None)
            self.log(f"[study] {name}: not run (--report-only)")
            self.runs.append(record)
            return {"record": record, "result": None}
        else:
            self.log(f"[study] {name}: running ({stage}, {config_file}) -> {run_dir}")
            t0 = time.perf_counter()
            result = fn()
            record.update(status="ran", wall_s=round(time.perf_counter() - t0, 1))
        config_yaml = os.path.join(run_dir, "config.yaml")
        record["config_yaml"] = config_yaml
        if os.path.isfile(config_yaml):
            with open(config_yaml) as f:
                record["seed"] = (yaml.safe_load(f) or {}).get("SEED")
        self.runs.append(record)
        self._save_runs()
        return {"record": record, "result": result}

    def _save_runs(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        state = {}
        if os.path.isfile(self.json_path):
            with open(self.json_path) as f:
                state = json.load(f)
        names = {r["name"] for r in self.runs}
        state["runs"] = [r for r in state.get("runs", []) if r["name"] not in names] + self.runs
        _write_json(self.json_path, state)

    def _stage(self, chain: _Chain, name: str, stage: str) -> Dict:
        overrides = chain.overrides(stage)
        run_dir = os.path.join(chain.output_dir, stage)
        opts = chain.opts + ["OUTPUT_DIR", run_dir] + overrides
        return self._record(
            name,
            stage,
            chain.files[stage],
            run_dir,
            opts,
            lambda: chain._maybe(stage),
            lambda: all(os.path.isfile(f) for f in chain.final[stage]),
        )

    def _stage3(self, chain: _Chain, name: str, seed: int, extra: List[str], wired: bool) -> Dict:
        out_name = f"stage3_seed{seed}"
        run_dir = os.path.join(chain.output_dir, out_name)
        overrides = (
            (chain.overrides("stage3") if wired else list(chain.budgets["stage3"])) + extra + ["SEED", str(seed)]
        )
        results_file = os.path.join(run_dir, "results.json")

        def train():
            results = chain._run("stage3", overrides, output_name=out_name)
            if not results:  # trained before, killed during its evaluation: evaluate the final model
                final = final_files("stage3", run_dir)[0]
                results = chain._run(
                    "stage3", overrides + ["MODEL.WEIGHTS", final], fn=_eval_stage, output_name=out_name
                )
            _write_json(results_file, results)
            return results

        rec = self._record(
            name,
            "stage3",
            chain.files["stage3"],
            run_dir,
            chain.opts + ["OUTPUT_DIR", run_dir] + overrides,
            train,
            lambda: os.path.isfile(results_file),
        )
        if os.path.isfile(results_file):
            with open(results_file) as f:
                rec["result"] = json.load(f)
        return rec

    def _chain(self, kind_dir: str, name: str, extra: Sequence[str] = ()) -> _Chain:
        s = self.settings
        files = {st: os.path.join(kind_dir, f"{st}.yaml") for st in ("stage1", "stage2", "stage3")}
        opts = self.opts + ["MODEL.GUIDE_WEIGHTS", self.teacher] + list(extra)
        budgets = {st: _budget(files[st], s.max_iter[i + 1], opts) for i, st in enumerate(files)}
        return _Chain(kind_dir, os.path.join(self.output_dir, name), self.args, opts, budgets)

    # ---- the study ----
    def run(self) -> Dict:
        s = self.settings
        if STUDY_TOY in (s.dataset_train + s.dataset_test):
            ensure_study_toy()
        for name in (s.dataset_train, s.dataset_test):
            if name not in DatasetCatalog.list():
                raise KeyError(
                    f"Data set {name!r} is not registered; give --dataset-train/--dataset-test names of "
                    f"registered data sets (e.g. afigan_toy_train, coco_2017_val)."
                )
        given = [v for k, v in zip(s.opts[::2], s.opts[1::2]) if k == "MODEL.GUIDE_WEIGHTS"]
        teacher_chain = _Chain(
            s.config_dir,
            os.path.join(self.output_dir, "teacher"),
            self.args,
            self.opts,
            {
                "stage0": _budget(os.path.join(s.config_dir, "stage0.yaml"), s.max_iter[0], self.opts)
                if os.path.isfile(os.path.join(s.config_dir, "stage0.yaml"))
                else []
            },
        )
        if given:
            self.teacher = given[-1]
        else:
            if not os.path.isfile(teacher_chain.files["stage0"]):
                raise FileNotFoundError(
                    f"{s.config_dir!r} has no stage0.yaml to train the teacher; add it or give "
                    f"MODEL.GUIDE_WEIGHTS on the command line."
                )
            self._stage(teacher_chain, "teacher", "stage0")
            self.teacher = teacher_chain.final["stage0"][0]
        chains: Dict[str, _Chain] = {}
        for kind in self._chains(s):
            chains[kind] = self._chain(_config_set(s, kind), kind)
            self._stage(chains[kind], f"{kind}/stage1", "stage1")
            if any(ARMS[k].chain == kind for k in s.kinds):
                self._stage(chains[kind], f"{kind}/stage2", "stage2")
        ablations = {}
        for a in s.ablations:
            kind, _, extra = ABLATIONS[a]
            chain = self._chain(_config_set(s, kind), ABLATION_RUN[a], extra)
            self._stage(chain, f"{ABLATION_RUN[a]}/stage1", "stage1")
            ablations[a] = chain
        detection: Dict[str, Dict[int, Dict]] = {}
        for seed in s.seeds:  # seed-major: an interrupted study has every arm at the first seeds
            for k in s.kinds:
                arm = ARMS[k]
                if arm.chain:
                    chain, extra, wired = chains[arm.chain], [], True
                else:
                    chain = chains.get(k) or self._chain(s.config_dir, k)
                    chains.setdefault(k, chain)
                    extra, wired = ["MODEL.AFI.INTERP", arm.interp], False
                rec = self._stage3(chain, f"{k}/stage3_seed{seed}", seed, extra, wired)
                if rec["result"] is not None:
                    detection.setdefault(k, {})[seed] = rec["result"]
        fidelity = self.fidelity(chains, ablations)
        stage1_runs = [("afi", chains["afi"])] if "afi" in chains else []
        stage1_runs += [(ABLATION_RUN[a], c) for a, c in ablations.items()]
        content = {
            name: content_loss(os.path.join(chain.output_dir, "stage1", "metrics.json")) for name, chain in stage1_runs
        }
        teacher_results = _eval_results(os.path.join(self.output_dir, "teacher", "stage0"))
        return {
            "detection": detection,
            "fidelity": fidelity,
            "content_loss": content,
            "teacher": teacher_results,
            "image_noise": self.image_noise(chains),
        }

    def image_noise(self, chains: Dict[str, "_Chain"], parts: int = 4) -> Dict:
        """AP of the reference arm's first-seed model on ``parts`` disjoint subsets of the test set."""
        s = self.settings
        if REFERENCE_ARM not in chains:
            return {}
        run_dir = os.path.join(chains[REFERENCE_ARM].output_dir, f"stage3_seed{s.seeds[0]}")
        pred = os.path.join(run_dir, "inference", s.dataset_test, "coco_instances_results.json")
        gt = getattr(MetadataCatalog.get(s.dataset_test), "json_file", None)
        if not (gt and os.path.isfile(pred)):
            return {}
        return {"run": run_dir, "parts": parts, **{task: subset_ap(gt, pred, parts, task) for task in ("bbox", "segm")}}

    def fidelity(self, chains: Dict[str, "_Chain"], ablations: Dict[str, "_Chain"]) -> Dict:
        """Fidelity of nearest, bilinear and each learned interpolator of the study on the test set."""
        s = self.settings
        learned = []  # (name, run dir whose config.yaml built it, weights)
        learned_kinds = {a.chain for a in ARMS.values() if a.chain}
        for kind, chain in chains.items():
            if kind not in learned_kinds or not os.path.isfile(chain.final["stage1"][0]):
                continue  # a stage-3-only arm, or a chain whose stage 1 has not finished
            learned.append((f"{kind} G (stage 1)", os.path.join(chain.output_dir, "stage1"), chain.final["stage1"][0]))
            if os.path.isfile(chain.final["stage2"][0]):
                learned.append(
                    (f"{kind} (stage 2)", os.path.join(chain.output_dir, "stage2"), chain.final["stage2"][0])
                )
        for a, chain in ablations.items():
            if os.path.isfile(chain.final["stage1"][0]):
                learned.append(
                    (
                        f"{ABLATIONS[a][0]} G, {ABLATIONS[a][1]}",
                        os.path.join(chain.output_dir, "stage1"),
                        chain.final["stage1"][0],
                    )
                )
        first = learned[0][1] if learned else None
        if first is None or not os.path.isfile(self.teacher):
            return {}
        cfg = load_cfg(
            argparse.Namespace(
                config_file=os.path.join(first, "config.yaml"), opts=["DATASETS.TEST", f"('{s.dataset_test}',)"]
            )
        )
        levels = list(cfg.MODEL.AFI.LEVELS)
        interpolators = {"nearest": fixed_x2("nearest", levels), "bilinear": fixed_x2("bilinear", levels)}
        for name, run_dir, weights in learned:
            run_cfg = load_cfg(argparse.Namespace(config_file=os.path.join(run_dir, "config.yaml"), opts=[]))
            interpolators[name] = learned_x2(run_cfg, weights)
        self.log(
            f"[study] fidelity: {len(interpolators)} interpolators on {s.dataset_test} "
            f"({s.fidelity_images or 'all'} images), levels {', '.join(levels)}"
        )
        t0 = time.perf_counter()
        scores = interpolation_fidelity(teacher_pyramids(cfg, s.dataset_test, s.fidelity_images), interpolators, levels)
        return {
            "levels": levels,
            "dataset": s.dataset_test,
            "teacher": cfg.MODEL.GUIDE_WEIGHTS,
            "weights": {name: w for name, _, w in learned},
            "scores": scores,
            "wall_s": round(time.perf_counter() - t0, 1),
        }


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


def content_loss(metrics_json: str) -> Optional[Dict[str, float]]:
    """Stage 1's content term at its end: per level and summed, the last record of its
    metrics.json (Detectron2 logs the median over the last 20 iterations)."""
    if not os.path.isfile(metrics_json):
        return None
    records = [r for r in read_metrics(metrics_json) if any(k.startswith("loss_content_") for k in r)]
    if not records:
        return None
    last = records[-1]
    per_level = {k[len("loss_content_") :]: float(v) for k, v in last.items() if k.startswith("loss_content_")}
    return {"iteration": last["iteration"], "total": sum(per_level.values()), **per_level}


def _eval_results(run_dir: str) -> Dict:
    """The last COCO evaluation in a detector run's metrics.json (bbox/AP, segm/AP), if any."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    records = [r for r in read_metrics(path) if "bbox/AP" in r]
    return {k: records[-1][k] for k in records[-1] if k.startswith(("bbox/", "segm/"))} if records else {}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf", "nan": JSON has no such numbers
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Aggregation, tables, charts
# --------------------------------------------------------------------------------------------


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


def _pm(ms: Dict) -> str:
    if ms.get("mean") is None:
        return "–"
    return f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms.get("std") is not None else "")


def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return "∞" if math.isinf(v) else format(v, spec)


def format_markdown(study: Dict) -> str:
    """study.md: how it was run, then the fidelity, ablation and detection tables."""
    lines = [
        "# AFI-GAN study",
        "",
        f"Command: `{study['command']}`  ",
        f"Machine: {study['machine']}; torch {study['torch']}; "
        f"load average {study['load_average_1min']:.2f} at the end; wall time of this invocation "
        f"{study['wall_s'] / 60:.1f} min (sum of all runs' own wall times {study['runs_wall_s'] / 60:.1f} min).",
        "",
    ]
    s = study["settings"]
    lines += [
        f"Settings: kinds {', '.join(s['kinds'])}; seeds {', '.join(map(str, s['seeds']))} (stage 3 only; one "
        f"teacher and one stage-1/2 chain per learned kind serve all seeds); ablations "
        f"{', '.join(s['ablations']) or 'none'}; "
        f"SOLVER.MAX_ITER stage 0/1/2/3 = {'/'.join(str(i or 'YAML') for i in s['max_iter'])}; data "
        f"{s['dataset_train']} -> {s['dataset_test']}.",
        "",
    ]
    fid = study.get("fidelity") or {}
    if fid:
        lines += [
            f"## Interpolation fidelity (teacher features of {fid['dataset']})",
            "",
            "x2 of the teacher's half-resolution level vs its full-resolution level; L1 and relative L2 "
            "(lower is better), PSNR over the level's feature range in dB (higher is better).",
            "",
        ]
        names = list(fid["scores"])
        lines += [
            "| interpolator | " + " | ".join(f"{l} L1 / relL2 / PSNR" for l in fid["levels"]) + " |",
            "|---|" + "---|" * len(fid["levels"]),
        ]
        for n in names:
            cells = []
            for l in fid["levels"]:
                m = fid["scores"][n].get(l)
                cells.append(
                    "–"
                    if m is None
                    else f"{_fmt(m['l1'], '.4f')} / {_fmt(m['rel_l2'], '.3f')} / {_fmt(m['psnr'], '.2f')}"
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if study.get("content_loss"):
        lines += [
            "## Ablations after stage 1 (AFI)",
            "",
            "| stage-1 run | content loss (sum over levels, last logged) | p2 L1 | mean rel. L2 over levels |",
            "|---|---|---|---|",
        ]
        label = {
            "afi": "afi (adversarial gradient to G, shared)",
            ABLATION_RUN["adv"]: "adversarial term detached (ADV_GRAD_TO_G False)",
            ABLATION_RUN["shared"]: "one interpolator per level (SHARED False)",
        }
        fid_name = {
            "afi": "afi G (stage 1)",
            ABLATION_RUN["adv"]: f"afi G, {ABLATIONS['adv'][1]}",
            ABLATION_RUN["shared"]: f"afi G, {ABLATIONS['shared'][1]}",
        }
        for name, c in study["content_loss"].items():
            sc = (fid.get("scores") or {}).get(fid_name.get(name, ""), {})
            rel = [m["rel_l2"] for m in sc.values()]
            lines.append(
                f"| {label.get(name, name)} | {_fmt(c and c['total'], '.4f')} | "
                f"{_fmt(sc.get('p2', {}).get('l1'), '.4f')} | "
                f"{_fmt(sum(rel) / len(rel) if rel else None, '.3f')} |"
            )
        lines.append("")
    summary = study.get("summary") or {}
    if summary:
        t = study.get("teacher") or {}
        lines += [
            "## Detection (stage 3, COCO AP on " + s["dataset_test"] + ")",
            "",
            f"Mean ± sample std over seeds; the stage-0 teacher (nearest FPN, same detector) reached bbox AP "
            f"{_fmt(t.get('bbox/AP'), '.2f')} / segm AP {_fmt(t.get('segm/AP'), '.2f')}.",
            "",
            "| arm | seeds | bbox AP | segm AP | bbox APs | segm APs | bbox AP per seed |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, e in summary.items():
            per = ", ".join(f"{e['bbox']['per_seed'][k]:.2f}" for k in sorted(e["bbox"]["per_seed"]))
            lines.append(
                f"| {ARMS[arm].label} | {e['bbox']['AP']['n']} | {_pm(e['bbox']['AP'])} | {_pm(e['segm']['AP'])} | "
                f"{_pm(e['bbox']['APs'])} | {_pm(e['segm']['APs'])} | {per} |"
            )
        noise = study.get("noise") or {}
        if noise.get("bbox") is not None:
            lines += [
                "",
                f"Seed noise (pooled std over seeds of one arm): bbox AP {noise['bbox']:.2f}, segm AP "
                f"{_fmt(noise.get('segm'), '.2f')}.",
            ]
        img = study.get("image_noise") or {}
        if img.get("bbox"):
            lines += [
                "",
                f"Image-sampling noise: the {REFERENCE_ARM} seed-{s['seeds'][0]} model on {img['parts']} "
                f"disjoint, interleaved parts of the test images: bbox AP "
                f"{', '.join(f'{v:.2f}' for v in img['bbox'])}; segm AP "
                f"{', '.join(f'{v:.2f}' for v in img['segm'])}.",
            ]
        if REFERENCE_ARM in summary and len(summary) > 1:
            lines += [
                "",
                f"Paired by seed, arm − {REFERENCE_ARM} (mean ± std of the per-seed differences; wins = "
                f"seeds where the arm is higher):",
                "",
                "| arm | Δ bbox AP | wins | Δ segm AP | wins | per-seed Δ bbox |",
                "|---|---|---|---|---|---|",
            ]
            for arm, e in summary.items():
                if arm == REFERENCE_ARM:
                    continue
                b, g = e["bbox"]["vs_" + REFERENCE_ARM], e["segm"]["vs_" + REFERENCE_ARM]
                per = ", ".join(f"{v:+.2f}" for _, v in sorted(b["diffs"].items()))
                lines.append(
                    f"| {ARMS[arm].label} | {_pm(b)} | {b['wins']}/{b['n']} | {_pm(g)} | {g['wins']}/{g['n']} | {per} |"
                )
        lines.append("")
    lines += ["## Runs", "", "| run | status | wall s | seed | output |", "|---|---|---|---|---|"]
    for r in study["runs"]:
        lines.append(
            f"| {r['name']} | {r['status']} | {_fmt(r.get('wall_s'), '.1f')} | {r.get('seed', '–')} | "
            f"{r['output_dir']} |"
        )
    return "\n".join(lines) + "\n"


def plot_fidelity(fid: Dict, path: str) -> str:
    """One column per level; rows: the L1 and relative-L2 reduction against nearest (%) and the
    PSNR gain over nearest (dB), one labelled bar per interpolator. Against nearest, because the
    differences between interpolators are a few per cent of the error itself."""
    import matplotlib  # only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, names = fid["levels"], list(fid["scores"])
    ref = fid["scores"].get(REFERENCE_ARM, {})
    rows = [
        ("L1 reduction vs nearest (%)", lambda m, r: 100.0 * (1.0 - m["l1"] / r["l1"])),
        ("rel. L2 reduction vs nearest (%)", lambda m, r: 100.0 * (1.0 - m["rel_l2"] / r["rel_l2"])),
        ("PSNR gain over nearest (dB)", lambda m, r: m["psnr"] - r["psnr"]),
    ]
    fig, axes = plt.subplots(len(rows), len(levels), figsize=(3.2 * len(levels), 2.6 * len(rows) + 1.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for j, l in enumerate(levels):
        for i, (title, measure) in enumerate(rows):
            ax = axes[i, j]
            vals = []
            for n in names:
                m, r = fid["scores"][n].get(l), ref.get(l)
                v = measure(m, r) if m and r else math.nan
                vals.append(v if math.isfinite(v) else 0.0)
            bars = ax.bar(range(len(names)), vals, color=[colours(k % 10) for k in range(len(names))])
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks([])
            ax.set_title(f"{l}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.margins(y=0.2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(k % 10)) for k in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7)
    fig.suptitle(
        f"x2 of the teacher's half-resolution features vs its full-resolution features ({fid['dataset']}): "
        f"gain over nearest (higher is better)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_detection(summary: Dict, path: str) -> str:
    """bbox and segm AP per arm: mean with sample-std error bars, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(arms), 4.2), squeeze=False)
    for ax, task in zip(axes[0], ("bbox", "segm")):
        means = [summary[a][task]["AP"]["mean"] or 0.0 for a in arms]
        stds = [summary[a][task]["AP"]["std"] or 0.0 for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, a in enumerate(arms):
            seeds = summary[a][task]["per_seed"]
            ax.plot([i] * len(seeds), list(seeds.values()), "k.", markersize=5)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([ARMS[a].label.replace(", ", ",\n") for a in arms], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(f"{task} AP")
        ax.set_title(f"stage-3 {task} AP, mean ± std over seeds (dots: seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def write_outputs(
    output_dir: str, settings: StudySettings, results: Dict, runs: List[Dict], command: str, wall_s: float
) -> Dict[str, str]:
    """Write study.json, study.md, fidelity.png and detection.png; return their paths."""
    summary = summarize(results["detection"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    study = {
        "command": command,
        "machine": _machine(),
        "torch": torch.__version__,
        "load_average_1min": load,
        "wall_s": wall_s,
        "runs_wall_s": sum(r.get("wall_s") or 0.0 for r in runs),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
        "runs": runs,
        "fidelity": results["fidelity"],
        "content_loss": results["content_loss"],
        "teacher": results["teacher"],
        "detection": results["detection"],
        "summary": summary,
        "noise": seed_noise(summary),
        "image_noise": results.get("image_noise") or {},
    }
    paths = {
        "json": os.path.join(output_dir, "study.json"),
        "md": os.path.join(output_dir, "study.md"),
        "fidelity_png": os.path.join(output_dir, "fidelity.png"),
        "detection_png": os.path.join(output_dir, "detection.png"),
    }
    _write_json(paths["json"], study)
    with open(paths["md"], "w") as f:
        f.write(format_markdown(study))
    if results["fidelity"]:
        plot_fidelity(results["fidelity"], paths["fidelity_png"])
    else:
        del paths["fidelity_png"]
    plot_detection(summary, paths["detection_png"])
    return paths


def run_study(
    settings: StudySettings, output_dir: str, args, command: str = "", log=print, report_only: bool = False
) -> Dict[str, str]:
    """Run (or resume) the whole study in ``output_dir`` and write its outputs; see the module
    docstring. ``report_only``: train nothing, write the outputs of the runs already finished."""
    t0 = time.perf_counter()
    runner = StudyRunner(settings, output_dir, args, log, report_only)
    results = runner.run()
    return write_outputs(output_dir, settings, results, runner.runs, command, round(time.perf_counter() - t0, 1))
