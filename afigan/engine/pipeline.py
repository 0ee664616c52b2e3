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

A stage whose final checkpoint exists is skipped; an interrupted stage resumes from its last
checkpoint, so re-running the same command after a kill continues where it stopped.
"""

import argparse
import copy
import json
import logging
import os
import sys
from typing import Dict, List, Optional

from detectron2.config import get_cfg
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils import logger as d2_logger

from afigan.analysis.metrics import plot_metrics
from afigan.analysis.predict import setup_predict_cfg
from afigan.analysis.pseudo_label import head_threshold, pseudo_label_images, resolve_images
from afigan.config import add_afigan_config
from afigan.data.datasets import PSEUDO_PREFIX

from .cli import eval_only, train_stage
from .stages import STAGES, Output, Teacher, final_files

__all__ = ["Pipeline", "stage_final_files"]


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
PSEUDO_LABELS = os.path.join("pseudo_labels", "pseudo_labels.json")


def _yaml_value(config_file: str, key: str, opts: Optional[List[str]] = None):
    cfg = add_afigan_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


class Pipeline:
    """Runs the stages of a config set in order; see the module docstring."""

    def __init__(self, config_dir: str, output_dir: str, args: argparse.Namespace, opts: Optional[List[str]] = None):
        self.files = {s: os.path.join(config_dir, f"{s}.yaml") for s in list(STAGES) + [SELF_TRAINING]}
        for s in ("stage1", "stage2", "stage3"):
            if not os.path.isfile(self.files[s]):
                raise FileNotFoundError(
                    f"Config set {config_dir!r} lacks {s}.yaml; give --config-dir a folder with "
                    f"stage1.yaml, stage2.yaml and stage3.yaml (e.g. configs/toy/pipeline)."
                )
        self.output_dir = output_dir
        self.args = args
        self.opts = list(opts or [])
        self.final = stage_final_files(output_dir)
        self.self_training = os.path.isfile(self.files[SELF_TRAINING])
        self.final[SELF_TRAINING] = final_files(TRAINED_AS[SELF_TRAINING], os.path.join(output_dir, SELF_TRAINING))
        self.pseudo_labels = os.path.join(output_dir, PSEUDO_LABELS)
        self.status = _status_logger()

    def _opt(self, key: str) -> str:
        for k, v in zip(self.opts[::2], self.opts[1::2]):
            if k == key:
                return v
        return ""

    def teacher_weights(self) -> str:
        """The command line's MODEL.GUIDE_WEIGHTS, else stage1.yaml's, else stage 0's model."""
        return (
            self._opt("MODEL.GUIDE_WEIGHTS")
            or _yaml_value(self.files["stage1"], "MODEL.GUIDE_WEIGHTS")
            or self.final["stage0"][0]
        )

    def overrides(self, stage: str) -> List[str]:
        """``KEY VALUE`` pairs that wire ``stage`` to earlier results, per the stage table. Keys
        the command line names are left out: its value (applied to every stage) wins."""
        out = []
        if stage == SELF_TRAINING:
            # The labeled sources (the command line's or the YAML's) and, last, the pseudo-labels.
            train = tuple(_yaml_value(self.files[stage], "DATASETS.TRAIN", self.opts)) + (
                PSEUDO_PREFIX + self.pseudo_labels,
            )
            out += ["DATASETS.TRAIN", train]
        for key, source in STAGES[TRAINED_AS.get(stage, stage)].inputs.items():
            if self._opt(key):
                continue
            if isinstance(source, Output):
                out += [key, self.final[source.stage][source.index]]
            elif isinstance(source, Teacher):
                if source.yaml_first and _yaml_value(self.files[stage], key):
                    continue
                out += [key, self.teacher_weights()]
        return out

    def _done(self, stage: str) -> bool:
        return all(os.path.isfile(f) for f in self.final[stage])

    def _run(self, stage: str, overrides: List[str], fn=None, output_name: str = ""):
        args = copy.copy(self.args)
        args.config_file = self.files[stage]
        args.opts = self.opts + ["OUTPUT_DIR", os.path.join(self.output_dir, output_name or stage)] + overrides
        args.resume = True  # continue an interrupted stage; a fresh stage has nothing to resume
        args.eval_only = False
        result = {}
        kind = TRAINED_AS.get(stage, stage)

        def main(a):
            result.update((fn or train_stage)(kind, a) or {})

        # Each stage's default_setup adds console/file handlers for its own OUTPUT_DIR; drop the
        # previous stage's so messages are not printed once per finished stage.
        for name in ("detectron2", "d2", "fvcore", "afigan"):
            logging.getLogger(name).handlers.clear()
        d2_logger.setup_logger.cache_clear()

        results_file = os.path.join(self.output_dir, f".{output_name or stage}_results.json")
        if self.args.num_gpus <= 1:
            launch(main, 1, args=(args,))
            return result
        # Spawned workers cannot hand back a dict: the main rank writes it to a file.
        if os.path.exists(results_file):
            os.remove(results_file)
        launch(
            _Worker(fn or train_stage, kind, results_file),
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
        """Run every stage that is not done; return the evaluation results of the stage-3 model."""
        if self.teacher_weights() == self.final["stage0"][0]:
            if not os.path.isfile(self.files["stage0"]):
                raise ValueError(
                    "Neither the command line nor stage1.yaml gives MODEL.GUIDE_WEIGHTS, and the config "
                    "set has no stage0.yaml to train a teacher."
                )
            self._maybe("stage0")
        self._maybe("stage1")
        self._maybe("stage2")
        results = self._maybe("stage3")
        last = "stage3"
        if self.self_training:
            self.pseudo_label()
            results = self._maybe(SELF_TRAINING)
            last = SELF_TRAINING
        if not results:
            eval_dir = os.path.join(self.output_dir, "eval")
            self.status.info(
                "evaluation: %s was already trained; evaluating %s into %s", last, self.final[last][0], eval_dir
            )
            results = self._run(last, ["MODEL.WEIGHTS", self.final[last][0]], fn=_eval_stage, output_name="eval")
        path = os.path.join(self.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        self.status.info("results: %s COCO evaluation written to %s", last, path)
        try:  # a plot is a convenience: without matplotlib (or metrics) the results above still stand
            self.status.info("metrics: training curves plotted in %s", plot_metrics(self.output_dir))
        except (ImportError, FileNotFoundError) as e:
            self.status.info("metrics: no plot (%s: %s)", type(e).__name__, e)
        return results

    def pseudo_label(self) -> str:
        """Self-training's first step: the stage-3 model's detections on ``SELF_TRAINING.IMAGES``
        of stage3_pseudo.yaml, written to ``OUTPUT/pseudo_labels/pseudo_labels.json`` (skipped
        when the file exists). Runs in this process, on ``MODEL.DEVICE``."""
        if os.path.isfile(self.pseudo_labels):
            self.status.info("pseudo-labels: skipped, already done (%s exists)", self.pseudo_labels)
            return self.pseudo_labels
        images = list(_yaml_value(self.files[SELF_TRAINING], "SELF_TRAINING.IMAGES", self.opts))
        threshold = float(_yaml_value(self.files[SELF_TRAINING], "SELF_TRAINING.SCORE_THRESHOLD", self.opts))
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
        weights = self.final["stage3"][0]
        self.status.info(
            "pseudo-labels: running: the stage-3 model %s on %d image(s), score >= %g -> %s",
            weights,
            len(paths),
            threshold,
            self.pseudo_labels,
        )
        cfg = setup_predict_cfg(self.files["stage3"], self.opts + ["MODEL.WEIGHTS", weights], head_threshold(threshold))
        done = pseudo_label_images(cfg, paths, self.pseudo_labels, threshold, ids=ids, log=self.status.info)
        self.status.info("pseudo-labels: %d on %d image(s)", done["annotations"], done["images"])
        return self.pseudo_labels

    def _maybe(self, stage: str) -> Dict:
        stage_dir = os.path.join(self.output_dir, stage)
        if self._done(stage):
            self.status.info("%s: skipped, already done (%s exists)", stage, self.final[stage][0])
            return {}
        overrides = self.overrides(stage)
        start = _resume_iteration(stage_dir, TRAINED_AS.get(stage, stage))
        how = f"resuming at iteration {start}" if start > 0 else "running"
        description = (
            "the target detector again, on labeled + pseudo-labeled images (self-training)"
            if stage == SELF_TRAINING
            else STAGES[stage].description
        )
        self.status.info(
            "%s: %s: %s -> %s%s",
            stage,
            how,
            description,
            stage_dir,
            f" (with {' '.join(map(str, overrides))})" if overrides else "",
        )
        return self._run(stage, overrides)


def _eval_stage(stage: str, args):
    return eval_only(args)


class _Worker:
    """Picklable main function for multi-process launches; the main rank saves the results."""

    def __init__(self, fn, stage, results_file):
        self.fn, self.stage, self.results_file = fn, stage, results_file

    def __call__(self, args):
        results = self.fn(self.stage, args) or {}
        if comm.is_main_process():
            with open(self.results_file, "w") as f:
                json.dump(results, f)
