"""COCO evaluation of every afigan detector: Detectron2's ``COCOEvaluator`` plus

* mask scores: with ``use_mask_scores`` (``MODEL.MASKIOU_ON``, CenterMask) each result also
  carries ``mask_score`` (the model's ``mask_scores`` = box score x predicted mask IoU, see
  :func:`afigan.modeling.roi_heads.maskiou_head.mask_iou_inference`) and segm AP ranks the masks
  by it, bbox AP by the box score, as CenterMask2's evaluator does;
* test-dev submissions: on a data set whose json has no ``annotations`` (COCO test-dev's
  ``image_info_test-dev2017.json``) nothing can be scored here, so besides
  ``coco_instances_results.json`` it writes the zip the COCO evaluation server takes, one per
  task (bbox, and segm for mask models: the server scores them as separate submissions), and
  prints where.
"""

import itertools
import json
import logging
import os
import re
import zipfile
from typing import Dict, List

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from afigan.io import atomic_write

__all__ = ["AFICOCOEvaluator", "submission_name"]

logger = logging.getLogger(__name__)


def _field(text: str) -> str:
    # "_" separates the fields of the server's file names, so a field keeps letters, digits and "-".
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "afigan"


def submission_name(json_file: str, dataset_name: str, alg: str) -> str:
    """``detections_<testset>_<alg>_results``: the COCO server's ``[type]_[testset]_[alg]_results``
    naming for detections, the test set read from an ``image_info_<testset>.json`` file name
    (``test-dev2017`` for COCO test-dev), else the data set's name."""
    m = re.fullmatch(r"image_info_(.+)\.json", os.path.basename(json_file or ""))
    return f"detections_{_field(m.group(1) if m else dataset_name)}_{_field(alg)}_results"


def _zip_json(f, name: str, obj) -> None:
    """A zip archive holding one JSON file ``name`` (the COCO server's submission format), into ``f``."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, json.dumps(obj))


class AFICOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator(dataset_name, ..., use_mask_scores=False, submission_alg="afigan")``.

    ``use_mask_scores``: rank masks by the predictions' ``mask_scores`` where they have them.
    ``submission_alg``: the ``[alg]`` field of the submission file names (annotation-free data
    sets only; needs ``output_dir``).
    """

    def __init__(self, dataset_name, *args, use_mask_scores: bool = False, submission_alg: str = "afigan", **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._dataset_name = dataset_name
        self._use_mask_scores = bool(use_mask_scores)
        self._submission_alg = submission_alg

    def process(self, inputs, outputs):
        # COCOEvaluator.process, keeping each instance's mask score beside its box score.
        for inp, out in zip(inputs, outputs):
            prediction = {"image_id": inp["image_id"]}
            if "instances" in out:
                instances = out["instances"].to(self._cpu_device)
                results = instances_to_coco_json(instances, inp["image_id"])  # one per instance, in order
                if self._use_mask_scores and instances.has("mask_scores") and instances.has("pred_masks"):
                    for r, s in zip(results, instances.mask_scores.tolist()):
                        r["mask_score"] = s
                prediction["instances"] = results
            if "proposals" in out:
                prediction["proposals"] = out["proposals"].to(self._cpu_device)
            if len(prediction) > 1:
                self._predictions.append(prediction)

    def _eval_predictions(self, predictions, img_ids=None):
        results = list(itertools.chain(*[p["instances"] for p in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(results)
        if "segm" not in tasks or not any("mask_score" in r for r in results):
            super()._eval_predictions(predictions, img_ids=img_ids)
        else:
            # Detectron2 scores every task from one list with one "score", so segm gets its own list
            # ranked by mask score (copies, made before the parent maps category ids in place), and
            # is scored without rewriting the results file.
            ranked = [{**r, "score": r.get("mask_score", r["score"])} for r in results]
            own_tasks, output_dir = self._tasks, self._output_dir
            try:
                self._tasks = [t for t in tasks if t != "segm"]
                super()._eval_predictions(predictions, img_ids=img_ids)
                if self._do_evaluation:
                    self._tasks, self._output_dir = ["segm"], None
                    super()._eval_predictions([{"instances": ranked}], img_ids=img_ids)
            finally:
                self._tasks, self._output_dir = own_tasks, output_dir
        if not self._do_evaluation:
            self._write_submission(results, len(predictions))

    def _write_submission(self, results: List[Dict], num_images: int) -> None:
        """One zip per task in ``<output_dir>/submission/<task>/``, holding the results json of
        the server's naming (box scores for bbox; mask scores, where there are any, for segm)."""
        if not self._output_dir:
            logger.warning(
                "%s has no annotations and the evaluator no output_dir: no submission file written.", self._dataset_name
            )
            return
        name = submission_name(self._metadata.get("json_file", ""), self._dataset_name, self._submission_alg)
        per_task = {"bbox": [{k: v for k, v in r.items() if k not in ("segmentation", "mask_score")} for r in results]}
        if any("segmentation" in r for r in results):
            # Without "bbox" the server, like Detectron2's evaluator, takes the mask's own area.
            per_task["segm"] = [
                {
                    **{k: v for k, v in r.items() if k not in ("bbox", "mask_score")},
                    "score": r.get("mask_score", r["score"]),
                }
                for r in results
            ]
        written = []
        for task, entries in per_task.items():
            folder = os.path.join(self._output_dir, "submission", task)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name + ".zip")
            atomic_write(path, lambda f: _zip_json(f, name + ".json", entries))
            written.append(path)
        print(
            f"{self._dataset_name} has no annotations, so nothing is scored here: {len(results)} detections on "
            f"{num_images} images are in {os.path.join(self._output_dir, 'coco_instances_results.json')}; "
            f"submit {' and '.join(written)} to the COCO evaluation server"
            f"{' (bbox and segm are separate submissions)' if len(written) > 1 else ''}.",
            flush=True,
        )
