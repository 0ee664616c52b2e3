"""Part "curves" of the study: stage 1 alone, per learned kind, trained until its fidelity curve
flattens, on the study's teacher.

Each arm (:func:`afigan.benchmark.study.settings.first_seed_arms`, then the second seeds) is one
stage-1 run through the pipeline's public stage API (``Pipeline.run_stage("stage1")``, skipped
when done, resumed when killed, the stale-settings rule) in ``OUTPUT/curves/<iters>it/<arm>``,
with the YAML's schedule compressed to ``iters`` (LR step and warm-up scaled alike), bfloat16
autocast (``SOLVER.AMP.ENABLED``: bfloat16 where the CPU has native kernels, else float32) and a
checkpoint every ``period`` iterations, every one kept (``SOLVER.CHECKPOINT_KEEP 0``). Each
checkpoint's G is then evaluated on the held-out images' teacher features (computed once, in
float32), per level: L1, relative L2, PSNR (:mod:`.fidelity`) and the blur measure (:mod:`.blur`);
the evaluations are cached in ``<arm>/stage1/curve.json``, so a killed study evaluates only what
is new. :func:`convergence` states the rule an arm's curve is judged by.
"""

import json
import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import torch

from afigan.config import cuda_missing, load_config
from afigan.engine.amp import precision_name

from .fidelity import fixed_x2, interpolation_fidelity, learned_x2, teacher_pyramids
from .report import write_json
from .settings import CurveArm, budget_overrides, config_set, first_seed_arms, second_seed_arms
from .stats import mean_over_levels

__all__ = ["CONVERGED_BELOW", "convergence", "best_other_kind", "run_curves", "checkpoints"]

# The convergence rule: an arm converged when its L1 (mean over its levels) improved by less than
# this fraction over the last third of its run (from its last evaluation at or before 2/3 of the
# iterations to its final one). 0.5 %: below the smallest gap between two interpolators the study
# reports as a difference (bilinear is 5-10 % better than nearest; learned kinds 1-9 % better than
# bilinear after 60 iterations).
CONVERGED_BELOW = 0.005
SECOND_SEED_RULE = (
    "AFI, and the other kind with the lowest final L1 relative to bilinear (mean over its levels) among the "
    "first seeds, again with SEED 1 after them"
)
_CKPT = re.compile(r"model_(\d{7})\.pth$")


def checkpoints(run_dir: str, max_iter: int) -> Dict[int, str]:
    """{iterations done: G file} of a stage-1 run: its periodic ``G_0/model_XXXXXXX.pth`` (after
    XXXXXXX + 1 iterations) and ``model_final.pth`` (after ``max_iter``)."""
    g_dir = os.path.join(run_dir, "G_0")
    out = {}
    for f in sorted(os.listdir(g_dir)) if os.path.isdir(g_dir) else []:
        m = _CKPT.match(f)
        if m:
            out[int(m.group(1)) + 1] = os.path.join(g_dir, f)
        elif f == "model_final.pth":
            out[max_iter] = os.path.join(g_dir, f)
    return dict(sorted(out.items()))


def convergence(points: Sequence[Dict], iters: int) -> Dict:
    """The rule of :data:`CONVERGED_BELOW` applied to ``points`` (``[{"iteration", "scores"}]``):
    ``{"from", "to", "improvement", "converged"}``; ``converged`` None when the run has no
    evaluation at or before 2/3 of ``iters`` besides its last one."""
    if not points:
        return {"from": None, "to": None, "improvement": None, "converged": None}
    last = points[-1]
    early = [p for p in points[:-1] if p["iteration"] <= round(2 * iters / 3)]
    if not early or last["iteration"] < iters:
        return {"from": None, "to": last["iteration"], "improvement": None, "converged": None}
    a, b = mean_over_levels(early[-1]["scores"], "l1"), mean_over_levels(last["scores"], "l1")
    improvement = (a - b) / a
    return {
        "from": early[-1]["iteration"],
        "to": last["iteration"],
        "improvement": improvement,
        "converged": bool(improvement < CONVERGED_BELOW),
    }


def best_other_kind(arms: Dict[str, Dict], reference: Dict) -> Optional[str]:
    """Among the first-seed, default-setting arms other than AFI, the kind whose final L1 relative
    to bilinear (mean over its levels) is lowest."""
    best, best_value = None, math.inf
    for name, a in arms.items():
        if a["kind"] == "afi" or a["seed"] != 0 or a["opts"] or not a["points"]:
            continue
        value = mean_over_levels(a["points"][-1]["scores"], "l1", reference["bilinear"])
        if value < best_value:
            best, best_value = a["kind"], value
    return best


class _Curves:
    def __init__(self, runner):
        self.runner, self.s, self.c = runner, runner.settings, runner.settings.curves
        self.root = os.path.join("curves", f"{self.c.iters}it")

    def pipeline(self, arm: CurveArm):
        kind_dir = config_set(self.s, arm.kind)
        opts = self.runner.opts + ["MODEL.GUIDE_WEIGHTS", self.runner.teacher]
        stage1 = os.path.join(kind_dir, "stage1.yaml")
        extra = budget_overrides(stage1, self.c.iters, opts) + [
            "SOLVER.CHECKPOINT_PERIOD",
            str(self.c.period),
            "SOLVER.CHECKPOINT_KEEP",
            "0",
            "SOLVER.AMP.ENABLED",
            "True",
            "SEED",
            str(arm.seed),
        ]
        return self.runner._pipeline(
            kind_dir, os.path.join(self.root, arm.name), opts, {"stage1": extra + list(arm.opts)}
        )

    def evaluate(self, arm: CurveArm, chain, pairs, levels) -> List[Dict]:
        run_dir = os.path.join(chain.output_dir, "stage1")
        cache_path = os.path.join(run_dir, "curve.json")
        key = {"dataset": self.s.dataset_test, "images": len(pairs)}
        cache = _read(cache_path)
        points = cache.get("points", {}) if cache.get("key") == key else {}
        config_yaml = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(config_yaml):
            return []
        cfg = load_config(config_yaml)
        for it, weights in checkpoints(run_dir, cfg.SOLVER.MAX_ITER).items():
            name = os.path.basename(weights)
            if name in points and points[name]["iteration"] == it:
                continue
            scores = interpolation_fidelity(pairs, {arm.name: learned_x2(cfg, weights)}, levels)[arm.name]
            points[name] = {"iteration": it, "weights": weights, "scores": scores}
            write_json(cache_path, {"key": key, "points": points})
        return sorted(points.values(), key=lambda p: p["iteration"])

    def run(self) -> Dict:
        r = self.runner
        teacher = r.ensure_teacher()
        t0 = time.perf_counter()
        base = load_config(
            os.path.join(config_set(self.s, "afi"), "stage1.yaml"),
            r.opts + ["MODEL.GUIDE_WEIGHTS", teacher, "SOLVER.AMP.ENABLED", "True"],
        )
        levels = list(base.MODEL.AFI.LEVELS)
        pairs = [] if r.report_only else list(teacher_pyramids(base, self.s.dataset_test, self.s.fidelity_images))
        eval_s = time.perf_counter() - t0
        fixed = {"nearest": fixed_x2("nearest", levels), "bilinear": fixed_x2("bilinear", levels)}
        reference = interpolation_fidelity(pairs, fixed, levels) if pairs else {}
        arms: Dict[str, Dict] = {}
        todo = first_seed_arms(self.c)
        second: Optional[str] = None
        while todo:
            for arm in todo:
                chain = self.pipeline(arm)
                rec = r._stage(chain, f"{self.root}/{arm.name}", "stage1")
                t1 = time.perf_counter()
                points = self.evaluate(arm, chain, pairs, levels) if pairs else []
                eval_s += time.perf_counter() - t1
                arms[arm.name] = {
                    "kind": arm.kind,
                    "seed": arm.seed,
                    "opts": list(arm.opts),
                    "label": arm.label,
                    "run_dir": os.path.join(chain.output_dir, "stage1"),
                    "weights": chain.final["stage1"][0],
                    "train_wall_s": rec["record"].get("wall_s"),
                    "points": points,
                    "convergence": convergence(points, self.c.iters),
                }
            todo = []
            if self.c.second_seed and second is None and reference:
                second = best_other_kind(arms, reference) or ""
                kinds = [k for k in ("afi", second) if k and k in self.c.kinds]
                todo = [a for a in second_seed_arms(kinds) if a.name not in arms]
        return {
            "iters": self.c.iters,
            "period": self.c.period,
            "precision": precision_name(base, _device(base)),
            "dataset": self.s.dataset_test,
            "images": len(pairs),
            "levels": levels,
            "teacher": teacher,
            "reference": reference,
            "arms": arms,
            "converged_below": CONVERGED_BELOW,
            "second_seed_rule": SECOND_SEED_RULE if self.c.second_seed else "",
            "second_seed_kind": second,
            "eval_wall_s": round(eval_s, 1),
        }


def _device(cfg):
    return torch.device("cpu" if cuda_missing(cfg.MODEL.DEVICE) else cfg.MODEL.DEVICE)


def _read(path: str) -> Dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_curves(runner) -> Dict:
    """Train (or skip, or resume) every curve arm of ``runner.settings.curves`` and evaluate its
    checkpoints; returns the study.json section "curves"."""
    return _Curves(runner).run()
