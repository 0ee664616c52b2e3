"""One command for the whole progressive-training chain (stage 0 -> 1 -> 2 -> 3 -> eval).

A *config set* is a directory holding ``stage1.yaml``, ``stage2.yaml``, ``stage3.yaml`` and
optionally ``stage0.yaml`` (the nearest-neighbour teacher, trained only when neither the
command line nor ``stage1.yaml`` gives ``MODEL.GUIDE_WEIGHTS``). Each stage writes to
``OUTPUT/stageN``; which of its final files feed which config key of a later stage is the table
:data:`afigan.engine.stages.STAGES`. Trailing ``KEY VALUE`` pairs of the command line apply to
every stage and always win over the table and the YAML files. After stage 3 (or, when it was
already done, by a separate evaluation in ``OUTPUT/eval``) the results go to
``OUTPUT/results.json`` and the training curves of every stage to ``OUTPUT/metrics.png``
(:mod:`afigan.analysis.metrics`).

**Self-training** (the ◊ rows of the README's results table): a config set that also holds
``stage3_pseudo.yaml`` adds two steps after stage 3. The stage-3 model pseudo-labels the images
of that file's ``SELF_TRAINING.IMAGES`` (folders, files, globs or registered data sets such as
``afigan_toy_unlabeled``) at ``SELF_TRAINING.SCORE_THRESHOLD`` into
``OUTPUT/pseudo_labels/pseudo_labels.json`` (:mod:`afigan.analysis.pseudo_label`); then a second
stage-3 training (``OUTPUT/stage3_pseudo``, the same inputs as stage 3) runs on the file's
``DATASETS.TRAIN`` plus that pseudo-label file, appended as the last source (so
``DATALOADER.SOURCE_REPEAT_FACTORS`` gives it the last factor). Its model is the one evaluated.

A stage whose final checkpoint exists is skipped and an interrupted stage resumes from its last
checkpoint, so re-running the same command after a kill continues where it stopped, but only when
the stage was started with the same settings (:mod:`afigan.engine.stage_record`): every step writes
``trained_with.json`` when it starts fresh, and a finished or interrupted step whose record differs
from the current run's stops the run with one sentence. ``retrain="stageN"`` (``--retrain``) removes
that step's outputs and those of every later step, and trains them again.

The public stage API (used by the study and the tests): :meth:`Pipeline.run_stage`,
:meth:`Pipeline.evaluate`, :meth:`Pipeline.is_done`, :meth:`Pipeline.option`.
"""

import argparse
import copy
import json
import logging
import os
import shutil
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils import logger as d2_logger

from afigan.analysis.metrics import plot_metrics
from afigan.analysis.predict import setup_predict_cfg
from afigan.analysis.pseudo_label import head_threshold, pseudo_label_images, resolve_images
from afigan.config import cfg_get, cuda_missing, flatten, load_config
from afigan.data.datasets import PSEUDO_PREFIX
from afigan.io import atomic_write_json

from .amp import precision_name
from .cli import eval_only, train_stage
from .stage_record import StaleStageError, make_record, read_record, record_differences, stale_sentence, write_record
from .stages import STAGES, Output, Teacher, final_files

__all__ = ["Pipeline", "stage_final_files", "PIPELINE_STEPS", "StaleStageError"]


def _status_logger() -> logging.Logger:
    """One console line per stage. Its own logger name: every stage's setup resets the handlers
    of the "afigan" and "detectron2" loggers."""
    log = logging.getLogger("afigan_pipeline")
    if not any(getattr(h, "_afigan_status", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[pipeline] %(message)s"))
        handler._afigan_status = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def _resume_iteration(stage_dir: str, stage: str) -> int:
    """The iteration an interrupted ``stage`` resumes at (from its ``last_checkpoint``), or -1."""
    path = os.path.join(stage_dir, STAGES[stage].trainer.checkpoint_dirs[0], "last_checkpoint")
    if not os.path.isfile(path):
        return -1
    name = open(path).read().strip()  # model_0000029.pth: the checkpoint after iteration 29
    digits = name[len("model_") : -len(".pth")]
    return int(digits) + 1 if digits.isdigit() else -1


def stage_final_files(output_dir: str) -> Dict[str, List[str]]:
    """The file(s) whose existence marks each stage of a pipeline in ``output_dir`` as done."""
    return {name: final_files(name, os.path.join(output_dir, name)) for name in STAGES}


# Pipeline steps trained by a stage of STAGES under another name (their own YAML and folder).
SELF_TRAINING = "stage3_pseudo"
TRAINED_AS = {SELF_TRAINING: "stage3"}
PSEUDO_STEP = "pseudo_labels"
PSEUDO_LABELS = os.path.join(PSEUDO_STEP, "pseudo_labels.json")
# Every step in the order it runs: --retrain STEP retrains STEP and everything after it.
PIPELINE_STEPS = tuple(STAGES) + (PSEUDO_STEP, SELF_TRAINING)
RETRAIN_HINT = "add --retrain {step} to train {step} and every later stage again"


def _eval_stage(stage: str, args):
    return eval_only(args)


class Pipeline:
    """Runs the stages of a config set in order; see the module docstring.

    ``stage_opts``: ``{stage: [KEY, VALUE, ...]}`` added to a stage's wiring (after it, so they win
    over the YAML), e.g. the study's budgets. ``retrain``: a step of :data:`PIPELINE_STEPS` to
    train again with every later step. ``way_on``: the second way out of a stale stage named in
    its sentence (``{step}`` and ``{folder}`` are filled in)."""

    def __init__(
        self,
        config_dir: str,
        output_dir: str,
        args: argparse.Namespace,
        opts: Optional[List[str]] = None,
        *,
        stage_opts: Optional[Mapping[str, Sequence]] = None,
        retrain: str = "",
        way_on: str = RETRAIN_HINT,
    ):
        self.files = {s: os.path.join(config_dir, f"{s}.yaml") for s in list(STAGES) + [SELF_TRAINING]}
        for s in ("stage1", "stage2", "stage3"):
            if not os.path.isfile(self.files[s]):
                raise FileNotFoundError(
                    f"Config set {config_dir!r} lacks {s}.yaml; give --config-dir a folder with "
                    f"stage1.yaml, stage2.yaml and stage3.yaml (e.g. configs/toy/pipeline)."
                )
        if retrain and retrain not in PIPELINE_STEPS:
            steps = ", ".join(PIPELINE_STEPS)
            raise ValueError(f"--retrain {retrain!r} is not a pipeline step; choose one of {steps}.")
        self.output_dir = output_dir
        self.args = args
        self.opts = list(opts or [])
        self.stage_opts = {k: list(v) for k, v in (stage_opts or {}).items()}
        self.final = stage_final_files(output_dir)
        self.self_training = os.path.isfile(self.files[SELF_TRAINING])
        self.final[SELF_TRAINING] = final_files(TRAINED_AS[SELF_TRAINING], os.path.join(output_dir, SELF_TRAINING))
        self.pseudo_labels = os.path.join(output_dir, PSEUDO_LABELS)
        self.status = _status_logger()
        self.way_on = way_on
        # Steps still to be retrained in this run (their folders are removed when they start).
        self._retrain = set(PIPELINE_STEPS[PIPELINE_STEPS.index(retrain) :]) if retrain else set()
        self._configs = {}
        self._unchecked = set()

    # ---- settings ----
    def _command_line(self, key: str) -> str:
        for k, v in zip(self.opts[::2], self.opts[1::2]):
            if k == key:
                return v
        return ""

    def option(self, key: str, stage: str = "stage1"):
        """The value of config ``key`` for ``stage``: the command line's, else the stage YAML's
        (with its ``_BASE_`` files), else the default. Each YAML is read once."""
        if stage not in self._configs:
            self._configs[stage] = load_config(self.files[stage], self.opts)
        return cfg_get(self._configs[stage], key)

    def teacher_weights(self) -> str:
        """The command line's MODEL.GUIDE_WEIGHTS, else stage1.yaml's, else stage 0's model."""
        return self.option("MODEL.GUIDE_WEIGHTS", "stage1") or self.final["stage0"][0]

    def overrides(self, stage: str, wired: bool = True) -> List:
        """``KEY VALUE`` pairs that wire ``stage`` to earlier results, per the stage table (none when
        not ``wired``), then the stage's ``stage_opts``. Keys the command line names are left out
        of the wiring: its value (applied to every stage) wins."""
        out = []
        if wired and stage == SELF_TRAINING:
            # The labeled sources (the command line's or the YAML's) and, last, the pseudo-labels.
            train = tuple(self.option("DATASETS.TRAIN", stage)) + (PSEUDO_PREFIX + self.pseudo_labels,)
            out += ["DATASETS.TRAIN", train]
        for key, source in STAGES[TRAINED_AS.get(stage, stage)].inputs.items() if wired else ():
            if self._command_line(key):
                continue
            if isinstance(source, Output):
                out += [key, self.final[source.stage][source.index]]
            elif isinstance(source, Teacher):
                if source.yaml_first and self.option(key, stage):
                    continue
                out += [key, self.teacher_weights()]
        return out + self.stage_opts.get(stage, [])

    def stage_config(self, stage: str, overrides: Sequence = (), *, name: str = "", wired: bool = True):
        """The config ``run_stage`` trains ``stage`` with (before the machine's device and SyncBN
        fallbacks): its YAML, the command line, the wiring, then ``overrides``."""
        opts = self.opts + ["OUTPUT_DIR", self._folder(stage, name)] + self.overrides(stage, wired) + list(overrides)
        cfg = load_config(self.files[stage], opts)
        cfg.MODEL.AFI.STAGE = TRAINED_AS.get(stage, stage)
        return cfg

    # ---- the stale-settings rule ----
    def _folder(self, stage: str, name: str = "") -> str:
        return os.path.join(self.output_dir, name or stage)

    def _record(self, stage: str, overrides: Sequence, name: str, wired: bool) -> Dict:
        extra = {"pseudo-label file": self.pseudo_labels} if stage == SELF_TRAINING and wired else {}
        return make_record(self.stage_config(stage, overrides, name=name, wired=wired), stage, extra)

    def _state(self, step: str, folder: str, record: Dict, finished: bool, started: bool) -> str:
        """'done' (reuse it), 'resume' or 'fresh'; stops with one sentence when what would be reused
        was started with other settings (:mod:`afigan.engine.stage_record`)."""
        if not (finished or started):
            return "fresh"
        state = "done" if finished else "resume"
        old = read_record(folder)
        if old is None:
            # Made before stages recorded their settings: nothing to compare with. Reusing it keeps
            # an older study or pipeline usable; the line says how to retrain it if in doubt.
            if folder not in self._unchecked:
                self._unchecked.add(folder)
                self.status.warning(
                    "%s: %s has no record of its settings (made by an older afigan), so it is reused "
                    "unchecked; if its settings may differ from this run's, give a new --output-dir or %s",
                    step,
                    folder,
                    self.way_on.format(step=step, folder=folder),
                )
            return state
        diffs = record_differences(old, record)
        if diffs:
            raise StaleStageError(stale_sentence(step, folder, diffs, self.way_on.format(step=step, folder=folder)))
        return state

    def _stage_state(self, stage: str, overrides: Sequence, name: str, wired: bool):
        folder = self._folder(stage, name)
        kind = TRAINED_AS.get(stage, stage)
        finished = all(os.path.isfile(f) for f in final_files(kind, folder))
        start = _resume_iteration(folder, kind)
        record = self._record(stage, overrides, name, wired) if (finished or start >= 0) else None
        state = self._state(stage, folder, record, finished, start >= 0) if record else "fresh"
        return state, start, folder

    def is_done(self, stage: str, overrides: Sequence = (), *, name: str = "", wired: bool = True) -> bool:
        """Whether ``run_stage`` with these arguments would skip ``stage``: its final checkpoints
        exist and it was started with the same settings. Raises :class:`StaleStageError` when
        its finished or interrupted run was started with other settings."""
        if stage in self._retrain:
            return False
        return self._stage_state(stage, overrides, name, wired)[0] == "done"

    def _start_retrain(self, step: str, folder: str) -> None:
        if step in self._retrain:
            self._retrain.discard(step)
            if os.path.exists(folder):
                shutil.rmtree(folder)
                self.status.info("%s: retraining (--retrain): removed %s", step, folder)

    # ---- running ----
    def run_stage(self, stage: str, overrides: Sequence = (), *, name: str = "", wired: bool = True) -> Dict:
        """Train ``stage`` into ``OUTPUT/<name or stage>`` with the wiring (when ``wired``), the
        stage's ``stage_opts`` and ``overrides``: skipped when done, resumed when interrupted (both
        only with the same settings), else started fresh (writing its record). Returns the final
        evaluation results ({} for stages 1-2 and when skipped)."""
        self._start_retrain(stage, self._folder(stage, name))
        state, start, folder = self._stage_state(stage, overrides, name, wired)
        kind = TRAINED_AS.get(stage, stage)
        if state == "done":
            self.status.info("%s: skipped, already done (%s exists)", stage, final_files(kind, folder)[0])
            return {}
        full = self.overrides(stage, wired) + list(overrides)
        if state == "fresh":
            write_record(folder, self._record(stage, overrides, name, wired))
        description = (
            "the target detector again, on labeled + pseudo-labeled images (self-training)"
            if stage == SELF_TRAINING
            else STAGES[stage].description
        )
        cfg = self.stage_config(stage, overrides, name=name, wired=wired)
        device = torch.device("cpu" if cuda_missing(cfg.MODEL.DEVICE) else cfg.MODEL.DEVICE)
        self.status.info(
            "%s: %s in %s: %s -> %s%s",
            name or stage,
            f"resuming at iteration {start}" if state == "resume" else "running",
            precision_name(cfg, device),
            description,
            folder,
            f" (with {' '.join(map(str, full))})" if full else "",
        )
        return self._launch(stage, full, train_stage, name or stage)

    def evaluate(
        self, stage: str, overrides: Sequence = (), *, name: str = "", wired: bool = True, into: str = "eval"
    ) -> Dict:
        """COCO evaluation of the final model of ``stage``'s run ``OUTPUT/<name or stage>`` (with
        the config that trained it) into ``OUTPUT/<into>``; returns the results."""
        weights = final_files(TRAINED_AS.get(stage, stage), self._folder(stage, name))[0]
        full = self.overrides(stage, wired) + list(overrides) + ["MODEL.WEIGHTS", weights]
        return self._launch(stage, full, _eval_stage, into)

    def _launch(self, stage: str, overrides: List, fn, output_name: str) -> Dict:
        args = copy.copy(self.args)
        args.config_file = self.files[stage]
        args.opts = self.opts + ["OUTPUT_DIR", os.path.join(self.output_dir, output_name)] + overrides
        args.resume = True  # continue an interrupted stage; a fresh stage has nothing to resume
        args.eval_only = False
        result = {}
        kind = TRAINED_AS.get(stage, stage)

        def main(a):
            result.update(fn(kind, a) or {})

        # Each stage's default_setup adds console/file handlers for its own OUTPUT_DIR; drop the
        # previous stage's so messages are not printed once per finished stage.
        for name in ("detectron2", "d2", "fvcore", "afigan"):
            logging.getLogger(name).handlers.clear()
        d2_logger.setup_logger.cache_clear()

        if self.args.num_gpus <= 1:
            launch(main, 1, args=(args,))
            return result
        # Spawned workers cannot hand back a dict: the main rank writes it to a file.
        results_file = os.path.join(self.output_dir, f".{output_name}_results.json")
        if os.path.exists(results_file):
            os.remove(results_file)
        launch(
            _Worker(fn, kind, results_file),
            self.args.num_gpus,
            num_machines=self.args.num_machines,
            machine_rank=self.args.machine_rank,
            dist_url=self.args.dist_url,
            args=(args,),
        )
        if os.path.exists(results_file):
            with open(results_file) as f:
                return json.load(f)
        return {}

    def run(self) -> Dict:
        """Run every stage that is not done; return the evaluation results of the stage-3 model
        (the self-trained one when the config set has stage3_pseudo.yaml)."""
        self.teacher_results: Dict = {}
        if self.teacher_weights() == self.final["stage0"][0]:
            if not os.path.isfile(self.files["stage0"]):
                raise ValueError(
                    "Neither the command line nor stage1.yaml gives MODEL.GUIDE_WEIGHTS, and the config "
                    "set has no stage0.yaml to train a teacher."
                )
            # Kept for the console: the teacher's AP beside the target's (empty when stage 0 was skipped).
            self.teacher_results = self.run_stage("stage0")
        self.run_stage("stage1")
        self.run_stage("stage2")
        results = self.run_stage("stage3")
        last = "stage3"
        if self.self_training:
            self.pseudo_label()
            results = self.run_stage(SELF_TRAINING)
            last = SELF_TRAINING
        if not results:
            eval_dir = os.path.join(self.output_dir, "eval")
            self.status.info(
                "evaluation: %s was already trained; evaluating %s into %s", last, self.final[last][0], eval_dir
            )
            results = self.evaluate(last, wired=False)  # the final model holds every weight
        path = atomic_write_json(os.path.join(self.output_dir, "results.json"), results, indent=2)
        self.status.info("results: %s COCO evaluation written to %s", last, path)
        try:  # a plot is a convenience: without matplotlib (or metrics) the results above still stand
            self.status.info("metrics: training curves plotted in %s", plot_metrics(self.output_dir))
        except (ImportError, FileNotFoundError) as e:
            self.status.info("metrics: no plot (%s: %s)", type(e).__name__, e)
        return results

    def pseudo_label(self) -> str:
        """Self-training's first step: the stage-3 model's detections on ``SELF_TRAINING.IMAGES``
        of stage3_pseudo.yaml, written to ``OUTPUT/pseudo_labels/pseudo_labels.json`` (skipped
        when the file exists and was made with the same settings and stage-3 model). Runs in this
        process, on ``MODEL.DEVICE``."""
        folder = os.path.dirname(self.pseudo_labels)
        self._start_retrain(PSEUDO_STEP, folder)
        images = list(self.option("SELF_TRAINING.IMAGES", SELF_TRAINING))
        threshold = float(self.option("SELF_TRAINING.SCORE_THRESHOLD", SELF_TRAINING))
        weights = self.final["stage3"][0]
        predict_opts = self.opts + ["MODEL.WEIGHTS", weights]
        # What the labels depend on: the stage-3 model (by content), its test-time config, the images
        # and the threshold.
        settings = dict(
            flatten(load_config(self.files["stage3"], predict_opts)),
            **{"SELF_TRAINING.IMAGES": images, "SELF_TRAINING.SCORE_THRESHOLD": threshold},
        )
        record = make_record(settings, PSEUDO_STEP)
        done = os.path.isfile(self.pseudo_labels)
        if self._state(PSEUDO_STEP, folder, record, done, False) == "done":
            self.status.info("pseudo-labels: skipped, already done (%s exists)", self.pseudo_labels)
            return self.pseudo_labels
        if not images:
            raise ValueError(
                f"{self.files[SELF_TRAINING]}: SELF_TRAINING.IMAGES is empty; name the unlabeled images to "
                f"pseudo-label (folders, files, globs or a data set such as afigan_toy_unlabeled)."
            )
        paths, ids, unmatched = resolve_images(images)
        if unmatched:
            raise ValueError(
                f"{self.files[SELF_TRAINING]}: SELF_TRAINING.IMAGES entry {unmatched[0]!r} is no image file, "
                f"folder, glob or registered data set; fix or remove it."
            )
        write_record(folder, record)
        self.status.info(
            "pseudo-labels: running: the stage-3 model %s on %d image(s), score >= %g -> %s",
            weights,
            len(paths),
            threshold,
            self.pseudo_labels,
        )
        cfg = setup_predict_cfg(self.files["stage3"], predict_opts, head_threshold(threshold))
        done = pseudo_label_images(cfg, paths, self.pseudo_labels, threshold, ids=ids, log=self.status.info)
        self.status.info("pseudo-labels: %d on %d image(s)", done["annotations"], done["images"])
        return self.pseudo_labels


class _Worker:
    """Picklable main function for multi-process launches; the main rank saves the results."""

    def __init__(self, fn, stage, results_file):
        self.fn, self.stage, self.results_file = fn, stage, results_file

    def __call__(self, args):
        results = self.fn(self.stage, args) or {}
        if comm.is_main_process():
            atomic_write_json(self.results_file, results)
