"""A training loader whose batch stream is a pure function of (seed, iteration, rank).

Detectron2's ``build_detection_train_loader`` restarts its sampler's stream when a job resumes,
and its augmentations draw from the global NumPy RNG, so a resumed run sees different data than
an uninterrupted one. Here batch ``i`` of rank ``r`` is always the same images with the same
augmentation draws: this rank's index stream comes from Detectron2's own sampler of
``DATALOADER.SAMPLER_TRAIN`` (``TrainingSampler``, ``RepeatFactorTrainingSampler`` with
``REPEAT_THRESHOLD`` / ``REPEAT_SQRT``, ``RandomSubsetTrainingSampler``), seeded with ``SEED``,
with the per-source repeat factors ``DATALOADER.SOURCE_REPEAT_FACTORS`` (one per ``DATASETS.TRAIN``
entry, e.g. labeled + pseudo-labeled images) folded into a ``RepeatFactorTrainingSampler``;
index batches are formed from it (aspect-ratio grouping decided from the annotated image
sizes, before any image is read), skipping to ``start_iter`` costs no image loading, and every
batch's mapping runs under RNGs seeded from (seed, iteration, rank). Workers take batches
round-robin and PyTorch's DataLoader returns them in order, so the stream is also independent
of ``DATALOADER.NUM_WORKERS``.
"""

import contextlib
import difflib
import itertools
import json
import logging
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from afigan.seeding import DATA, seed_all_rngs

from .datasets import register_pseudo_names
from .image_io import UnreadableImageError

__all__ = [
    "ResumableBatches",
    "build_resumable_train_loader",
    "build_index_sampler",
    "check_dataset_names",
    "source_repeat_factors",
    "SOURCE_KEY",
    "load_train_dataset",
    "dataset_errors",
    "SKIPPED_METRIC",
]

logger = logging.getLogger(__name__)
SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")
# The key of a training dataset dict naming its source: its index in DATASETS.TRAIN (set only
# when DATALOADER.SOURCE_REPEAT_FACTORS is given).
SOURCE_KEY = "train_source"


def check_dataset_names(names: Sequence[str], key: str = "DATASETS.TRAIN") -> None:
    """Raise KeyError naming the first unregistered data set and the registered ones, in one sentence.
    Names ``pseudo:<file.json>`` (pseudo-label files) are registered here first."""
    register_pseudo_names(names, key)
    if not names:
        raise ValueError(f"{key} is empty; name at least one registered data set (e.g. afigan_toy_train).")
    registered = sorted(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=5, cutoff=0.5)
            listed = ", ".join(close or [n for n in registered if n.startswith("afigan_")] or registered[:5])
            raise KeyError(
                f"{key}: data set {name!r} is not registered; register it first (see datasets/README.md) or use one "
                f"of the {len(registered)} registered ones ({'closest: ' if close else 'e.g. '}{listed})."
            )


def _json_file(name: str) -> str:
    return MetadataCatalog.get(name).get("json_file", "") if name in DatasetCatalog.list() else ""


@contextlib.contextmanager
def dataset_errors(names: Sequence[str], key: str):
    """Turn the errors of loading the data sets ``names`` (Detectron2 / pycocotools: invalid
    JSON, a category id outside the categories) into one sentence naming the data set and file."""
    try:
        yield
    except json.JSONDecodeError as e:
        bad = next((n for n in names if _json_file(n) and not _valid_json(_json_file(n))), names[0])
        raise ValueError(
            f"{key}: the annotation file {_json_file(bad) or bad!r} of data set {bad!r} is not valid JSON "
            f"({e.msg} at line {e.lineno}, column {e.colno}); regenerate or fix it."
        ) from None
    except KeyError as e:
        msg = str(e.args[0]) if e.args else ""
        if "category_id=" not in msg:
            raise
        cid = msg.split("category_id=", 1)[1].split()[0]
        where = " or ".join(repr(_json_file(n) or n) for n in names)
        raise ValueError(
            f"{key}: an annotation in {where} has category_id {cid}, which is not among the file's "
            f"'categories'; fix the annotation or add the category."
        ) from None


def _valid_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
        return True
    except ValueError:
        return False


def _num_classes_key(cfg):
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RCNN" in arch:
        return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if arch == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    return None, None  # other heads (FCOS, CenterMask, wrappers) keep their own keys


def _check_images_and_classes(cfg, dicts: List[Dict]) -> None:
    names = tuple(cfg.DATASETS.TRAIN)
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise FileNotFoundError(
            f"DATASETS.TRAIN {names}: {len(missing)} of the {len(dicts)} images listed in the annotations do "
            "not exist, "
            f"e.g. {missing[0]!r}; check the data set's image root or remove them from the JSON."
        )
    key, num = _num_classes_key(cfg)
    classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
    if key and classes is not None and num != len(classes):
        raise ValueError(
            f"{key} is {num}, but DATASETS.TRAIN {names[0]!r} has {len(classes)} categories "
            f"({', '.join(map(str, classes[:5]))}{', ...' if len(classes) > 5 else ''}); set {key} {len(classes)}."
        )


def load_train_dataset(cfg) -> List[Dict]:
    """The dataset dicts of ``DATASETS.TRAIN`` (empty-annotation filter as Detectron2's), or one
    sentence naming what is wrong: an unregistered name, an invalid annotation file, a category
    id outside the categories, listed images that do not exist, a ``NUM_CLASSES`` that is not the
    number of categories."""
    check_dataset_names(cfg.DATASETS.TRAIN)
    names = list(cfg.DATASETS.TRAIN)
    factors = source_repeat_factors(cfg)
    try:
        with dataset_errors(cfg.DATASETS.TRAIN, "DATASETS.TRAIN"):
            if factors is None:
                dicts = get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            else:
                # One source at a time, to know each image's source (Detectron2 concatenates the
                # sources before filtering, so the result is the same list).
                dicts = []
                for i, name in enumerate(names):
                    part = get_detection_dataset_dicts(
                        [name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, check_consistency=False
                    )
                    dicts += [dict(d, **{SOURCE_KEY: i}) for d in part]
                if len(names) > 1:
                    check_metadata_consistency("thing_classes", names)
    except AssertionError as e:
        raise ValueError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} gives no usable training image ({e}); "
            f"every image lacks a non-crowd box, or the data set is empty."
        ) from None
    _check_images_and_classes(cfg, dicts)
    _check_masks(cfg, dicts)
    return dicts


def _check_masks(cfg, dicts: List[Dict]) -> None:
    """A mask model needs a mask on every training instance, and RLE masks (pseudo-labels, COCO
    crowd-free RLE files) need ``INPUT.MASK_FORMAT bitmask``: Detectron2's mapper would stop in
    the middle of training otherwise."""
    if not cfg.MODEL.MASK_ON:
        return
    anns = [(d, a) for d in dicts for a in d.get("annotations", ())]
    bare = next((d for d, a in anns if "segmentation" not in a), None)
    if bare is not None:
        raise ValueError(
            f"MODEL.MASK_ON is set, but {bare['file_name']!r} of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} has "
            f"instances without a mask (a box-only pseudo-label file?); train boxes only (MODEL.MASK_ON False) "
            f"or pseudo-label with a mask model."
        )
    if cfg.INPUT.MASK_FORMAT == "polygon" and any(isinstance(a["segmentation"], dict) for _, a in anns):
        raise ValueError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} has RLE masks (e.g. pseudo-labels), which "
            f"INPUT.MASK_FORMAT polygon cannot read; set INPUT.MASK_FORMAT bitmask."
        )


def source_repeat_factors(cfg) -> Optional[List[float]]:
    """``DATALOADER.SOURCE_REPEAT_FACTORS`` checked against ``DATASETS.TRAIN`` (one positive factor
    per entry), or None when it is empty (every source as Detectron2 samples it)."""
    factors = [float(f) for f in cfg.DATALOADER.get("SOURCE_REPEAT_FACTORS", ())]
    if not factors:
        return None
    names = tuple(cfg.DATASETS.TRAIN)
    if len(factors) != len(names) or min(factors) <= 0:
        raise ValueError(
            f"DATALOADER.SOURCE_REPEAT_FACTORS {tuple(factors)} needs one positive factor per DATASETS.TRAIN "
            f"entry {names}; give {len(names)} numbers > 0, or () for none."
        )
    if cfg.DATALOADER.SAMPLER_TRAIN == "RandomSubsetTrainingSampler":
        raise ValueError(
            "DATALOADER.SOURCE_REPEAT_FACTORS works with SAMPLER_TRAIN TrainingSampler or "
            "RepeatFactorTrainingSampler, not RandomSubsetTrainingSampler; drop one of the two."
        )
    return factors


def build_index_sampler(cfg, dataset: List[Dict], seed: int) -> Iterable[int]:
    """Detectron2's sampler named by ``DATALOADER.SAMPLER_TRAIN``, seeded with ``seed`` (this
    rank's infinite index stream). With ``DATALOADER.SOURCE_REPEAT_FACTORS`` every image's repeat
    factor is its source's factor (times its category-frequency factor under
    ``RepeatFactorTrainingSampler``): an image of a source with factor f is drawn f times per pass
    over the data on average (the fraction by stochastic rounding, as Detectron2's sampler does)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    d = cfg.DATALOADER
    per_source = source_repeat_factors(cfg)
    if per_source is not None:
        if any(SOURCE_KEY not in x for x in dataset):
            raise ValueError(
                "DATALOADER.SOURCE_REPEAT_FACTORS: the dataset dicts carry no source; load them with "
                "afigan.data.loader.load_train_dataset."
            )
        factors = torch.tensor([per_source[x[SOURCE_KEY]] for x in dataset], dtype=torch.float32)
        if name == "RepeatFactorTrainingSampler":
            factors = factors * RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dataset, d.REPEAT_THRESHOLD, sqrt=d.REPEAT_SQRT
            )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, d.REPEAT_THRESHOLD, sqrt=d.REPEAT_SQRT
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dataset), d.RANDOM_SUBSET_RATIO, seed_shuffle=seed, seed_subset=seed)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN must be one of {SAMPLERS}, got {name!r}.")


class ResumableBatches(IterableDataset):
    """Infinite stream of mapped batches (lists of dicts) for this rank.

    Args:
        dataset: list of Detectron2 dataset dicts.
        mapper: callable dataset dict -> model input dict.
        sampler: this rank's infinite index stream (e.g. :func:`build_index_sampler`).
        batch_size: images per batch on this rank.
        seed: base seed of the augmentation RNGs.
        aspect_ratio_grouping: batch only images that are all landscape or all portrait.
        start_iter: the first batch to produce (a resumed run passes its start iteration).
    """

    def __init__(
        self,
        dataset: List[Dict],
        mapper: Callable,
        sampler: Iterable[int],
        batch_size: int,
        seed: int = 0,
        aspect_ratio_grouping: bool = True,
        start_iter: int = 0,
    ):
        self.dataset = dataset
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = int(seed)
        self.grouping = aspect_ratio_grouping
        self.start_iter = start_iter
        self.rank = comm.get_rank()
        self._portrait = np.array([d.get("height", 1) > d.get("width", 0) for d in dataset])
        self._warned = set()

    def _all_index_batches(self) -> Iterator[List[int]]:
        buckets = {False: [], True: []}
        plain: List[int] = []
        for idx in self.sampler:
            bucket = buckets[bool(self._portrait[idx])] if self.grouping else plain
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def index_batches(self) -> Iterator[List[int]]:
        """Index batches of this rank, starting at ``start_iter``."""
        return itertools.islice(self._all_index_batches(), self.start_iter, None)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, indices in enumerate(self.index_batches()):
            if i % num_workers != worker:
                continue
            iteration = self.start_iter + i
            # Per-batch RNG state: the same batch gets the same augmentation draws on resume.
            seed_all_rngs(self.seed, iteration, self.rank, DATA)
            batch = _Batch()
            for idx in indices:
                batch.append(self._map(idx, batch))
            yield batch

    def _map(self, idx: int, batch: "_Batch"):
        """The mapped image ``idx``; an image that cannot be decoded is skipped (one warning
        line, counted in the batch) and the next image of the data set takes its place, so the
        stream stays a function of the iteration (a resumed run skips the same images). A
        missing file still stops (usually a wrong image root), and so does a data set where
        no image can be read."""
        for k in range(len(self.dataset)):
            try:
                return self.mapper(self.dataset[(idx + k) % len(self.dataset)])
            except UnreadableImageError as e:
                batch.skipped += 1
                if e.file_name not in self._warned:
                    self._warned.add(e.file_name)
                    logger.warning(
                        "Skipped an unreadable training image (counted as %s in the metrics): %s", SKIPPED_METRIC, e
                    )
        raise ValueError(
            f"DATASETS.TRAIN: none of the {len(self.dataset)} images can be read (e.g. "
            f"{self.dataset[idx]['file_name']!r}); check the image files."
        )


def build_resumable_train_loader(
    cfg, mapper: Callable, start_iter: int = 0, dataset: Optional[List[Dict]] = None
) -> DataLoader:
    """A DataLoader of :class:`ResumableBatches` from ``cfg.DATASETS.TRAIN`` starting at batch
    ``start_iter``.

    Uses SOLVER.IMS_PER_BATCH (split over ranks), DATALOADER.{NUM_WORKERS, SAMPLER_TRAIN,
    REPEAT_THRESHOLD, ASPECT_RATIO_GROUPING, FILTER_EMPTY_ANNOTATIONS} and SEED (0 when
    negative). ``dataset``: already loaded dataset dicts (default :func:`load_train_dataset`).
    """
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes ({world}).")
    if dataset is None:
        dataset = load_train_dataset(cfg)
    seed = max(cfg.SEED, 0)
    stream = ResumableBatches(
        dataset,
        mapper,
        build_index_sampler(cfg, dataset, seed),
        total // world,
        seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        start_iter=start_iter,
    )
    return _CountingLoader(
        stream, batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=_identity, persistent_workers=False
    )


SKIPPED_METRIC = "data/skipped_images"


class _Batch(list):
    """A batch (list of mapped dicts) that also carries how many unreadable images it skipped."""

    skipped = 0

    def __reduce__(self):  # DataLoader workers pickle batches: keep the count
        return _make_batch, (list(self), self.skipped)


def _make_batch(items, skipped):
    b = _Batch(items)
    b.skipped = skipped
    return b


class _CountingLoader(DataLoader):
    """The training DataLoader; puts the running count of skipped images into the trainer's
    event storage (metrics.json, TensorBoard) as ``data/skipped_images`` once there is one."""

    skipped = 0

    def __iter__(self):
        for batch in super().__iter__():
            if getattr(batch, "skipped", 0):
                self.skipped += batch.skipped
                try:
                    get_event_storage().put_scalar(SKIPPED_METRIC, self.skipped, smoothing_hint=False)
                except AssertionError:  # iterated outside a trainer (no event storage)
                    pass
            yield batch


def _identity(batch):
    # Batches are already lists of dicts; a module-level function pickles into workers.
    return batch
