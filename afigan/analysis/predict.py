"""Predictions of a trained detector on image files (``tools/demo.py``), in the conventions of
Detectron2's ``demo/demo.py``: ``--config-file``, ``--input``, ``--output``,
``--confidence-threshold`` and trailing ``KEY VALUE`` overrides.

For every image it writes ``OUTPUT/<image stem>.png`` (the image with the boxes, classes, scores
and masks drawn by Detectron2's ``Visualizer``; a stem seen before gets ``_2``, ``_3``, ...), and
for all images one ``OUTPUT/predictions.json`` in the COCO results format (what
``COCOEvaluator`` writes as ``coco_instances_results.json``) plus the image's ``file_name``:

* ``category_id``: the data set's own COCO category id (the inverse of its metadata's
  ``thing_dataset_id_to_contiguous_id``; the model's class index where there is none);
* ``image_id``: the id the image has in the JSON of a data set of the config
  (``DATASETS.TEST``, then ``DATASETS.TRAIN``) when the file is one of its images, else the
  file's 0-based position in the list of inputs;
* ``bbox`` (XYWH, pixels of the original image), ``score``, and ``segmentation`` (RLE) when the
  model predicts masks.

Class names come from the metadata of ``DATASETS.TRAIN[0]`` (the classes the model was trained
on), else of ``DATASETS.TEST[0]``.
"""

import argparse
import glob
import json
import logging
import os
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import detectron2.data.transforms as T
import torch
import tqdm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model

import afigan.data.datasets  # noqa: F401  (registers the toy data sets the toy configs name)
import afigan.modeling  # noqa: F401  (registers afigan's backbones, necks and heads)
from afigan.checkpoint import AFICheckpointer
from afigan.config import fallback_syncbn, load_config
from afigan.data.image_io import read_image_or_raise

__all__ = [
    "IMAGE_EXTENSIONS",
    "SCORE_THRESHOLD_KEYS",
    "setup_predict_cfg",
    "expand_inputs",
    "Predictor",
    "readable_predictions",
    "draw_instances",
    "DatasetIndex",
    "predict_images",
    "split_overrides",
    "demo_parser",
    "demo_main",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Every detector's test-time score threshold: Detectron2's demo sets the first three (RetinaNet,
# the R-CNN box heads incl. Cascade and CenterMask's, panoptic FPN); afigan's FCOS (alone, or as
# CenterMask's proposal generator) reads MODEL.FCOS.INFERENCE_TH_TEST (afigan/config.py).
SCORE_THRESHOLD_KEYS = (
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
    "MODEL.FCOS.INFERENCE_TH_TEST",
)


def setup_predict_cfg(config_file: str, opts: Sequence[str] = (), confidence_threshold: float = 0.5):
    """:func:`afigan.config.load_config` of ``config_file`` and ``opts`` (CPU when CUDA is
    missing), every key of :data:`SCORE_THRESHOLD_KEYS` set to ``confidence_threshold`` (after
    ``opts``, as Detectron2's demo does), SyncBN -> BN; frozen."""
    if not config_file:
        raise FileNotFoundError("--config-file is empty; give the path of a YAML config.")
    if os.path.isfile(config_file) and not config_file.endswith((".yaml", ".yml")):
        raise ValueError(f"--config-file {config_file!r}: the demo reads yacs YAML configs only.")
    cfg = load_config(config_file, opts, fallback="predicting")
    cfg.merge_from_list([x for key in SCORE_THRESHOLD_KEYS for x in (key, confidence_threshold)])
    fallback_syncbn(cfg)
    cfg.freeze()
    return cfg


def expand_inputs(inputs: Iterable[str]) -> Tuple[List[str], List[str]]:
    """``(files, entries that name none)`` of ``inputs``: a file as it is, a folder's image files
    (by extension, sorted, not recursive), a glob pattern's matches (sorted); each file once, in
    that order."""
    out: List[str] = []
    unmatched: List[str] = []
    for entry in inputs:
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            found = sorted(
                os.path.join(entry, f)
                for f in os.listdir(entry)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(entry, f))
            )
        elif os.path.isfile(entry):
            found = [entry]
        else:
            found = sorted(f for f in glob.glob(entry) if os.path.isfile(f))
        if not found:
            unmatched.append(entry)
        out += [f for f in found if f not in out]
    return out, unmatched


class Predictor:
    """Detectron2's ``DefaultPredictor`` for an RGB image (H, W, 3) uint8 array: the cfg's model in
    eval mode with ``MODEL.WEIGHTS`` loaded by :class:`afigan.checkpoint.AFICheckpointer` (which
    also reads the reference's released layout), test-time resize, one image per forward."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            AFICheckpointer(self.model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
        else:
            logger.warning("MODEL.WEIGHTS is empty: predicting with randomly initialised weights.")
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, rgb, file_name: str = ""):
        if self.input_format == "RGB":
            image = rgb
        elif self.input_format == "BGR":
            image = rgb[:, :, ::-1]
        else:  # e.g. "L": let Detectron2 convert the file itself
            image = read_image_or_raise(file_name, self.input_format)
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            return self.model([{"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}])[0]


class DatasetIndex:
    """The image ids of the data sets a config names (and their loaded dicts, see :meth:`dicts`).

    ``image_id(path)``: the id of ``path`` in ``DATASETS.TEST`` then ``DATASETS.TRAIN`` (matched by
    real path), or None. A data set is loaded only when needed, and skipped when its metadata
    gives an ``image_root`` that none of the paths still unmatched lies under (so a COCO training
    set is not read for images from elsewhere)."""

    def __init__(self, cfg, paths: Sequence[str]):
        self.names = [n for n in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN) if n in DatasetCatalog.list()]
        self._pending = {os.path.realpath(p) for p in paths}
        self._ids: Dict[str, int] = {}
        self._loaded: Dict[str, List[Dict]] = {}
        self._unread = list(dict.fromkeys(self.names))

    def dicts(self, name: str) -> List[Dict]:
        if name not in self._loaded:
            self._loaded[name] = DatasetCatalog.get(name)
        return self._loaded[name]

    def image_id(self, path: str) -> Optional[int]:
        real = os.path.realpath(path)
        while real not in self._ids and real in self._pending and self._unread:
            name = self._unread.pop(0)
            root = getattr(MetadataCatalog.get(name), "image_root", None)
            if root and not any(p.startswith(os.path.realpath(root) + os.sep) for p in self._pending):
                continue
            for d in self.dicts(name):
                f = os.path.realpath(d["file_name"])
                if f in self._pending and f not in self._ids:
                    self._ids[f] = d["image_id"]
            self._pending -= set(self._ids)
        return self._ids.get(real)


def class_metadata(cfg, index: DatasetIndex):
    """The metadata of the training data set (else the test set): ``thing_classes`` for the
    drawings and, loading the data set once when its registration does not give it,
    ``thing_dataset_id_to_contiguous_id`` (set by Detectron2's ``load_coco_json``)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not names:
        return MetadataCatalog.get("__unused")
    meta = MetadataCatalog.get(names[0])
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id") and names[0] in DatasetCatalog.list():
        index.dicts(names[0])
    return meta


def readable_predictions(
    predictor: "Predictor", paths: Sequence[str], threshold: float, unreadable: List[str], log, desc: str
):
    """``(position, path, rgb, instances)`` for every readable image of ``paths`` (a tqdm bar over
    them), its CPU instances scoring at least ``threshold``; an unreadable file is logged in one
    line, appended to ``unreadable`` and left out."""
    for position, path in enumerate(tqdm.tqdm(paths, desc=desc, unit="image")):
        try:
            rgb = read_image_or_raise(path, "RGB")
        except OSError as e:
            log(f"skipped: {e}")
            unreadable.append(path)
            continue
        instances = predictor(rgb, path)["instances"].to("cpu")
        # The heads threshold their own scores, but a final score can still fall below: FCOS
        # thresholds the class probability and reports sqrt(class x centerness).
        yield position, path, rgb, instances[instances.scores >= threshold]


def draw_instances(rgb, meta, instances, png: str) -> None:
    """Write ``png``: the RGB image (H, W, 3) uint8 with ``instances`` drawn by Detectron2's
    ``Visualizer`` (class names from ``meta``)."""
    # Imported here, not at the top: the Visualizer needs OpenCV (the `vis` extra, which Detectron2
    # does not declare), and training, the pipeline and evaluation import this module without drawing.
    try:
        from detectron2.utils.visualizer import ColorMode, Visualizer
    except ModuleNotFoundError as e:
        if e.name != "cv2":
            raise
        raise ModuleNotFoundError(
            "Drawing predictions needs OpenCV, which Detectron2's Visualizer imports: "
            "pip install -e '.[vis]' (or opencv-python-headless).",
            name="cv2",
        ) from None
    Visualizer(rgb, meta, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances).save(png)


def predict_images(cfg, paths: Sequence[str], output_dir: str, log=None) -> Dict:
    """Predict every file of ``paths`` (see the module docstring for what is written to
    ``output_dir``). An unreadable file gets one line (``log``, default: stderr above the
    progress bar) and is left out; the others are still processed. Returns
    ``{"images": [written PNGs], "unreadable": [files], "predictions": path, "detections": n}``."""
    log = log or (lambda msg: tqdm.tqdm.write(msg, file=sys.stderr))
    os.makedirs(output_dir, exist_ok=True)
    predictor = Predictor(cfg)
    index = DatasetIndex(cfg, paths)
    meta = class_metadata(cfg, index)
    to_dataset_id = {v: k for k, v in getattr(meta, "thing_dataset_id_to_contiguous_id", {}).items()}
    threshold = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    records, images, unreadable, stems = [], [], [], {}
    for position, path, rgb, instances in readable_predictions(predictor, paths, threshold, unreadable, log, "demo"):
        image_id = index.image_id(path)
        image_id = position if image_id is None else image_id
        for r in instances_to_coco_json(instances, image_id):
            r["category_id"] = to_dataset_id.get(r["category_id"], r["category_id"])
            records.append({"file_name": path, **r})
        stem = os.path.splitext(os.path.basename(path))[0]
        stems[stem] = stems.get(stem, 0) + 1
        name = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
        png = os.path.join(output_dir, f"{name}.png")
        draw_instances(rgb, meta, instances, png)
        images.append(png)
    out = os.path.join(output_dir, "predictions.json")
    with open(out, "w") as f:
        json.dump(records, f)
    return {"images": images, "unreadable": unreadable, "predictions": out, "detections": len(records)}


_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")  # a config key: MODEL.WEIGHTS, SEED


def split_overrides(inputs: Sequence[str], opts: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(inputs, opts)`` with the trailing overrides that ``--input`` (one or more values)
    swallowed moved to ``opts``: they start at the first word that looks like a config key and is
    not an existing path (``DSC_01.JPG`` looks like one)."""
    inputs, opts = list(inputs), list(opts)
    for i, word in enumerate(inputs):
        if _KEY.match(word) and not os.path.exists(word):
            return inputs[:i], inputs[i:] + opts
    return inputs, opts


def demo_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="the detector's YAML config")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders (their image files) or glob patterns such as 'dir/*.jpg'",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the drawings and predictions.json")
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of a detection (default 0.5), set for every detector kind",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, last on the line, e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu",
    )
    p.add_argument(
        "--opts",
        dest="more_opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="the same, the way Detectron2's demo/demo.py takes them",
    )
    return p


def demo_main(argv=None, description: str = __doc__) -> Dict:
    """``tools/demo.py``: parse ``argv``, predict, print where everything went. SystemExit with one
    sentence when no input matches or no input could be read."""
    args = demo_parser(description).parse_args(argv)
    inputs, opts = split_overrides(args.input, list(args.opts) + list(args.more_opts))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = setup_predict_cfg(args.config_file, opts, args.confidence_threshold)
    paths, unmatched = expand_inputs(inputs)
    if not paths:
        raise SystemExit(f"demo: no image file matches --input {' '.join(inputs)}.")
    for entry in unmatched:
        print(f"demo: --input {entry!r} matches no image file; going on with the others.", file=sys.stderr)
    result = predict_images(cfg, paths, args.output)
    if not result["images"]:
        raise SystemExit(f"demo: none of the {len(paths)} input file(s) could be read as an image.")
    print(
        f"demo: {len(result['images'])} image(s) drawn in {args.output}, {result['detections']} detection(s) "
        f"with score >= {args.confidence_threshold} in {result['predictions']}"
        + (f"; {len(result['unreadable'])} unreadable file(s) skipped" if result["unreadable"] else "")
        + "."
    )
    return result
