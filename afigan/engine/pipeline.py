"""One command for the whole progressive-training chain (stage 0 -> 1 -> 2 -> 3 -> eval).

A *config set* is a directory holding ``stage1.yaml``, ``stage2.yaml``, ``stage3.yaml`` and
optionally ``stage0.yaml`` (the nearest-neighbour teacher, trained only when ``stage1.yaml``
gives no ``MODEL.GUIDE_WEIGHTS``). Each stage writes to ``OUTPUT/stageN`` and its final file is
wired into the next stage's weights keys:

    stage0/model_final.pth          -> MODEL.GUIDE_WEIGHTS (stages 1, 2) and MODEL.WEIGHTS (stage 2, as the reference)
    stage1/G_0/model_final.pth      -> MODEL.AFI_GEN_WEIGHTS (stage 2)
    stage1/D_0/model_final.pth      -> MODEL.AFI_DIS_WEIGHTS (stage 2)
    stage2/AFExtractor/model_final.pth -> MODEL.AF_EXTRACTOR_WEIGHTS (stage 3)
    stage3/model_final.pth          -> MODEL.WEIGHTS (evaluation in OUTPUT/eval when stage 3 was
                                       skipped; a stage-3 run evaluates itself at its end)

A stage whose final checkpoint exists is skipped; an interrupted stage resumes from its last
checkpoint, so re-running the same command after a kill continues where it stopped.
"""
import argparse
import copy
import json
import logging
import os
from typing import Dict, List, Optional

from detectron2.config import get_cfg
from detectron2.engine import launch

from afigan.config import add_afigan_config

from .cli import eval_only, train_stage

__all__ = ["Pipeline", "stage_final_files"]

logger = logging.getLogger("afigan.pipeline")


def stage_final_files(output_dir: str) -> Dict[str, List[str]]:
    """The file(s) whose existence marks each stage as done."""
    j = os.path.join
    return {
        "stage0": [j(output_dir, "stage0", "model_final.pth")],
        "stage1": [j(output_dir, "stage1", "G_0", "model_final.pth"), j(output_dir, "stage1", "D_0", "model_final.pth")],
        "stage2": [j(output_dir, "stage2", "AFExtractor", "model_final.pth")],
        "stage3": [j(output_dir, "stage3", "model_final.pth")],
    }


def _stage_cfg_value(config_file: str, key: str) -> str:
    cfg = add_afigan_config(get_cfg())
    cfg.merge_from_file(config_file)
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


class Pipeline:
    """Runs the stages of a config set in order; see the module docstring."""

    def __init__(self, config_dir: str, output_dir: str, args: argparse.Namespace, opts: Optional[List[str]] = None):
        self.files = {s: os.path.join(config_dir, f"{s}.yaml") for s in ("stage0", "stage1", "stage2", "stage3")}
        for s in ("stage1", "stage2", "stage3"):
            if not os.path.isfile(self.files[s]):
                raise FileNotFoundError(f"Config set {config_dir!r} lacks {s}.yaml.")
        self.output_dir = output_dir
        self.args = args
        self.opts = list(opts or [])
        self.final = stage_final_files(output_dir)

    def _done(self, stage: str) -> bool:
        return all(os.path.isfile(f) for f in self.final[stage])

    def _run(self, stage: str, overrides: List[str], fn=None, output_name: str = ""):
        args = copy.copy(self.args)
        args.config_file = self.files[stage]
        args.opts = self.opts + ["OUTPUT_DIR", os.path.join(self.output_dir, output_name or stage)] + overrides
        args.resume = True  # continue an interrupted stage; a fresh stage has nothing to resume
        args.eval_only = False
        result = {}

        def main(a):
            result.update((fn or train_stage)(stage, a) or {})

        # Each stage's default_setup adds console/file handlers for its own OUTPUT_DIR; drop the
        # previous stage's so messages are not printed once per finished stage.
        for name in ("detectron2", "d2", "fvcore", "afigan"):
            logging.getLogger(name).handlers.clear()
        from detectron2.utils import logger as d2_logger

        d2_logger.setup_logger.cache_clear()

        results_file = os.path.join(self.output_dir, f".{output_name or stage}_results.json")
        if self.args.num_gpus <= 1:
            launch(main, 1, args=(args,))
            return result
        # Spawned workers cannot hand back a dict: the main rank writes it to a file.
        if os.path.exists(results_file):
            os.remove(results_file)
        launch(_Worker(fn or train_stage, stage, results_file), self.args.num_gpus, num_machines=self.args.num_machines,
               machine_rank=self.args.machine_rank, dist_url=self.args.dist_url, args=(args,))
        if os.path.exists(results_file):
            with open(results_file) as f:
                return json.load(f)
        return {}

    def teacher_weights(self) -> str:
        given = _stage_cfg_value(self.files["stage1"], "MODEL.GUIDE_WEIGHTS")
        override = self._opt("MODEL.GUIDE_WEIGHTS")
        return override or given or self.final["stage0"][0]

    def _opt(self, key: str) -> str:
        for k, v in zip(self.opts[::2], self.opts[1::2]):
            if k == key:
                return v
        return ""

    def run(self) -> Dict:
        """Run every stage that is not done; return the evaluation results of the stage-3 model."""
        teacher = self.teacher_weights()
        if teacher == self.final["stage0"][0]:
            if not os.path.isfile(self.files["stage0"]):
                raise ValueError("stage1.yaml gives no MODEL.GUIDE_WEIGHTS and the config set has no stage0.yaml to train a teacher.")
            self._maybe("stage0", [])
        self._maybe("stage1", ["MODEL.GUIDE_WEIGHTS", teacher])
        stage2_weights = _stage_cfg_value(self.files["stage2"], "MODEL.WEIGHTS") or self._opt("MODEL.WEIGHTS") or teacher
        self._maybe("stage2", ["MODEL.GUIDE_WEIGHTS", teacher, "MODEL.WEIGHTS", stage2_weights,
                               "MODEL.AFI_GEN_WEIGHTS", self.final["stage1"][0], "MODEL.AFI_DIS_WEIGHTS", self.final["stage1"][1]])
        results = self._maybe("stage3", ["MODEL.AF_EXTRACTOR_WEIGHTS", self.final["stage2"][0]])
        if not results:
            results = self._run("stage3", ["MODEL.WEIGHTS", self.final["stage3"][0]], fn=_eval_stage, output_name="eval")
        path = os.path.join(self.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        logger.info("Stage-3 evaluation results written to %s", path)
        return results

    def _maybe(self, stage: str, overrides: List[str]) -> Dict:
        if self._done(stage):
            logger.info("Pipeline: %s is done (%s exists); skipping it.", stage, self.final[stage][0])
            return {}
        logger.info("Pipeline: running %s with %s", stage, " ".join(overrides))
        return self._run(stage, overrides)


def _eval_stage(stage: str, args):
    return eval_only(args)


class _Worker:
    """Picklable main function for multi-process launches; the main rank saves the results."""

    def __init__(self, fn, stage, results_file):
        self.fn, self.stage, self.results_file = fn, stage, results_file

    def __call__(self, args):
        from detectron2.utils import comm

        results = self.fn(self.stage, args) or {}
        if comm.is_main_process():
            with open(self.results_file, "w") as f:
                json.dump(results, f)
