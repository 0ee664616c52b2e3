"""Runs the study: one teacher, one stage-1/2 chain per learned kind, the stage-1 ablations and the
stage-3 runs of every arm and seed, each through the pipeline's public stage API
(:meth:`afigan.engine.pipeline.Pipeline.run_stage` / ``is_done`` / ``evaluate``), so a run is
skipped when finished and resumed when interrupted only if it was started with the same settings
(the pipeline's stale-settings rule, :mod:`afigan.engine.stage_record`); stage 3 is finished when
its ``results.json`` exists. ``study.json`` records every run as it goes."""

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from afigan.analysis.metrics import read_metrics
from afigan.config import cfg_get, load_config
from afigan.engine.pipeline import Pipeline

from .curves import run_curves
from .fidelity import fixed_x2, interpolation_fidelity, learned_x2, teacher_pyramids
from .probe import run_probe
from .report import write_json, write_outputs
from .settings import (
    ABLATION_RUN,
    ABLATIONS,
    ARMS,
    PARTS,
    REFERENCE_ARM,
    STUDY_TOY,
    StudySettings,
    budget_overrides,
    chain_kinds,
    config_set,
    ensure_study_toy,
)
from .stats import subset_ap

__all__ = ["budget_overrides", "StudyRunner", "content_loss", "run_study"]

# The second way out of a stale run (the first: a new --output-dir); the study has no --retrain.
WAY_ON = "delete that folder (and the study's runs that start from it) to train it again"


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
        for kind in chain_kinds(settings):
            if not os.path.isdir(config_set(settings, kind)):
                raise FileNotFoundError(
                    f"The {kind} chain needs the config set {config_set(settings, kind)!r} "
                    f"(stage1.yaml, stage2.yaml, stage3.yaml); make it, or leave {kind} out of "
                    f"--kinds and --ablations."
                )
        if "curves" in settings.parts:
            for kind in settings.curves.kinds:
                if not os.path.isfile(os.path.join(config_set(settings, kind), "stage1.yaml")):
                    raise FileNotFoundError(
                        f"The {kind} curve needs the config set {config_set(settings, kind)!r} (stage1.yaml); "
                        f"make it, or leave {kind} out of --curve-kinds."
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
        self.teacher = ""
        self.runs: List[Dict] = []
        data = ["DATASETS.TRAIN", f"('{settings.dataset_train}',)", "DATASETS.TEST", f"('{settings.dataset_test}',)"]
        self.opts = data + list(settings.opts)

    # ---- one run ----
    def _pipeline(self, config_dir: str, name: str, opts: List, budgets: Dict[str, List[str]]) -> Pipeline:
        """A config set's pipeline in ``OUTPUT/name`` whose stages get the study's budgets on top of
        the stage table's wiring (they come last, so they win over the YAML)."""
        return Pipeline(
            config_dir, os.path.join(self.output_dir, name), self.args, opts, stage_opts=budgets, way_on=WAY_ON
        )

    def _record(
        self, name: str, stage: str, config_file: str, run_dir: str, opts: List, run: Callable[[], Dict], done: bool
    ) -> Dict:
        record = {
            "name": name,
            "stage": stage,
            "config_file": config_file,
            "output_dir": run_dir,
            "opts": [str(o) for o in opts],
        }
        if done:
            record.update(status="skipped, already done", wall_s=(self.previous.get(name) or {}).get("wall_s"))
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
            result = run()
            record.update(status="ran", wall_s=round(time.perf_counter() - t0, 1))
        config_yaml = os.path.join(run_dir, "config.yaml")
        record["config_yaml"] = config_yaml
        if os.path.isfile(config_yaml):
            record["seed"] = cfg_get(load_config(config_yaml), "SEED", None)
        self.runs.append(record)
        self._save_runs()
        return {"record": record, "result": result}

    def _save_runs(self) -> None:
        state = {}
        if os.path.isfile(self.json_path):
            with open(self.json_path) as f:
                state = json.load(f)
        names = {r["name"] for r in self.runs}
        state["runs"] = [r for r in state.get("runs", []) if r["name"] not in names] + self.runs
        write_json(self.json_path, state)

    def _stage(self, chain: Pipeline, name: str, stage: str) -> Dict:
        run_dir = os.path.join(chain.output_dir, stage)
        opts = chain.opts + ["OUTPUT_DIR", run_dir] + chain.overrides(stage)
        done = chain.is_done(stage)
        return self._record(name, stage, chain.files[stage], run_dir, opts, lambda: chain.run_stage(stage), done)

    def _stage3(self, chain: Pipeline, name: str, seed: int, extra: List[str], wired: bool) -> Dict:
        out_name = f"stage3_seed{seed}"
        run_dir = os.path.join(chain.output_dir, out_name)
        overrides = extra + ["SEED", str(seed)]
        results_file = os.path.join(run_dir, "results.json")
        run = dict(name=out_name, wired=wired)

        def train():
            results = chain.run_stage("stage3", overrides, **run)
            if not results:  # trained before, killed during its evaluation: evaluate the final model
                results = chain.evaluate("stage3", overrides, into=out_name, **run)
            write_json(results_file, results)
            return results

        done = chain.is_done("stage3", overrides, **run) and os.path.isfile(results_file)
        opts = chain.opts + ["OUTPUT_DIR", run_dir] + chain.overrides("stage3", wired) + overrides
        rec = self._record(name, "stage3", chain.files["stage3"], run_dir, opts, train, done)
        if os.path.isfile(results_file):
            with open(results_file) as f:
                rec["result"] = json.load(f)
        return rec

    def _chain(self, kind_dir: str, name: str, extra: Sequence[str] = ()) -> Pipeline:
        s = self.settings
        files = {st: os.path.join(kind_dir, f"{st}.yaml") for st in ("stage1", "stage2", "stage3")}
        opts = self.opts + ["MODEL.GUIDE_WEIGHTS", self.teacher] + list(extra)
        budgets = {st: budget_overrides(files[st], s.max_iter[i + 1], opts) for i, st in enumerate(files)}
        return self._pipeline(kind_dir, name, opts, budgets)

    # ---- the study ----
    def check_data(self) -> None:
        """Make the study's toy set when it is used, and check both data sets are registered."""
        s = self.settings
        if STUDY_TOY in (s.dataset_train + s.dataset_test):
            ensure_study_toy()
        for name in (s.dataset_train, s.dataset_test):
            if name not in DatasetCatalog.list():
                raise KeyError(
                    f"Data set {name!r} is not registered; give --dataset-train/--dataset-test names of "
                    f"registered data sets (e.g. afigan_toy_train, coco_2017_val)."
                )

    def ensure_teacher(self) -> str:
        """The study's one teacher (stage 0 of ``--config-dir`` in ``OUTPUT/teacher``, trained when
        missing, skipped when done), or the command line's ``MODEL.GUIDE_WEIGHTS``; returns its weights."""
        if self.teacher:
            return self.teacher
        s = self.settings
        stage0 = os.path.join(s.config_dir, "stage0.yaml")
        budget0 = budget_overrides(stage0, s.max_iter[0], self.opts) if os.path.isfile(stage0) else []
        teacher_chain = self._pipeline(s.config_dir, "teacher", self.opts, {"stage0": budget0})
        # The pipeline's rule: the command line's MODEL.GUIDE_WEIGHTS, else stage1.yaml's, else stage 0's.
        self.teacher = teacher_chain.teacher_weights()
        if self.teacher == teacher_chain.final["stage0"][0]:
            if not os.path.isfile(stage0):
                raise FileNotFoundError(
                    f"{s.config_dir!r} has no stage0.yaml to train the teacher; add it or give "
                    f"MODEL.GUIDE_WEIGHTS on the command line."
                )
            self._stage(teacher_chain, "teacher", "stage0")
        return self.teacher

    def run(self) -> Dict:
        """The detection study (part "detection"): teacher, chains, ablations, stage-3 arms, fidelity."""
        s = self.settings
        self.ensure_teacher()
        chains: Dict[str, Pipeline] = {}
        for kind in chain_kinds(s):
            chains[kind] = self._chain(config_set(s, kind), kind)
            self._stage(chains[kind], f"{kind}/stage1", "stage1")
            if any(ARMS[k].chain == kind for k in s.kinds):
                self._stage(chains[kind], f"{kind}/stage2", "stage2")
        ablations = {}
        for a in s.ablations:
            kind, _, extra = ABLATIONS[a]
            chain = self._chain(config_set(s, kind), ABLATION_RUN[a], extra)
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

    def image_noise(self, chains: Dict[str, Pipeline], parts: int = 4) -> Dict:
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

    def fidelity(self, chains: Dict[str, Pipeline], ablations: Dict[str, Pipeline]) -> Dict:
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
        cfg = load_config(os.path.join(first, "config.yaml"), ["DATASETS.TEST", f"('{s.dataset_test}',)"])
        levels = list(cfg.MODEL.AFI.LEVELS)
        interpolators = {"nearest": fixed_x2("nearest", levels), "bilinear": fixed_x2("bilinear", levels)}
        for name, run_dir, weights in learned:
            run_cfg = load_config(os.path.join(run_dir, "config.yaml"))
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


def run_study(
    settings: StudySettings, output_dir: str, args, command: str = "", log=print, report_only: bool = False
) -> Dict[str, str]:
    """Run (or resume) the whole study in ``output_dir`` and write its outputs (see the package
    docstring). ``report_only``: train nothing, write the outputs of the runs already finished."""
    t0 = time.perf_counter()
    unknown = [p for p in settings.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--part: {unknown[0]!r} is not a part of the study; choose from {', '.join(PARTS)} or all.")
    runner = StudyRunner(settings, output_dir, args, log, report_only)
    runner.check_data()
    results: Dict = {}
    if "curves" in settings.parts:
        # --report-only evaluates nothing: the curves already in study.json stand.
        previous = _previous_section(runner.json_path, "curves") if report_only else {}
        results["curves"] = previous or run_curves(runner)
    if "probe" in settings.parts:
        curves = results.get("curves") or _previous_section(runner.json_path, "curves")
        if not curves:
            log("[study] probe: no curves in this study yet (run --part curves first): only the fixed arms")
        results["probe"] = run_probe(runner, curves or {})
    if "detection" in settings.parts:
        results.update(runner.run())
    wall = round(time.perf_counter() - t0, 1)
    return write_outputs(output_dir, settings, results, runner.runs, command, wall, settings.parts)


def _previous_section(json_path: str, key: str) -> Dict:
    if not os.path.isfile(json_path):
        return {}
    with open(json_path) as f:
        return json.load(f).get(key) or {}
