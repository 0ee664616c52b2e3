"""A training loader whose batch stream is a pure function of (seed, iteration, rank).

Detectron2's ``build_detection_train_loader`` restarts its sampler's stream when a job resumes,
and its augmentations draw from the global NumPy RNG, so a resumed run sees different data than
an uninterrupted one. Here batch ``i`` of rank ``r`` is always the same images with the same
augmentation draws: this rank's index stream comes from Detectron2's own sampler of
``DATALOADER.SAMPLER_TRAIN`` (``TrainingSampler``, ``RepeatFactorTrainingSampler`` with
``REPEAT_THRESHOLD`` / ``REPEAT_SQRT``, ``RandomSubsetTrainingSampler``), seeded with ``SEED``;
index batches are formed from it (aspect-ratio grouping decided from the annotated image
sizes, before any image is read), skipping to ``start_iter`` costs no image loading, and every
batch's mapping runs under RNGs seeded from (seed, iteration, rank). Workers take batches
round-robin and PyTorch's DataLoader returns them in order, so the stream is also independent
of ``DATALOADER.NUM_WORKERS``.
"""
import itertools
import logging
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data import DatasetCatalog, get_detection_dataset_dicts
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from afigan.seeding import DATA, seed_all_rngs

__all__ = ["ResumableBatches", "build_resumable_train_loader", "build_index_sampler", "check_dataset_names",
           "load_train_dataset"]

logger = logging.getLogger(__name__)
SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


def check_dataset_names(names: Sequence[str], key: str = "DATASETS.TRAIN") -> None:
    """Raise KeyError naming the first unregistered data set, in one sentence."""
    if not names:
        raise ValueError(f"{key} is empty; name at least one registered data set (e.g. afigan_toy_train).")
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise KeyError(
                f"{key}: data set {name!r} is not registered; register it first (see datasets/README.md) "
                f"or use e.g. 'afigan_toy_train' or 'coco_2017_train'."
            )


def load_train_dataset(cfg) -> List[Dict]:
    """The dataset dicts of ``DATASETS.TRAIN`` (empty-annotation filter as Detectron2's), or one
    sentence naming what is wrong."""
    check_dataset_names(cfg.DATASETS.TRAIN)
    try:
        return get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    except AssertionError as e:
        raise ValueError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} gives no usable training image ({e}); "
            f"every image lacks a non-crowd box, or the data set is empty."
        ) from None


def build_index_sampler(cfg, dataset: List[Dict], seed: int) -> Iterable[int]:
    """Detectron2's sampler named by ``DATALOADER.SAMPLER_TRAIN``, seeded with ``seed`` (this
    rank's infinite index stream)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    d = cfg.DATALOADER
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, d.REPEAT_THRESHOLD, sqrt=d.REPEAT_SQRT)
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

    def __init__(self, dataset: List[Dict], mapper: Callable, sampler: Iterable[int], batch_size: int, seed: int = 0,
                 aspect_ratio_grouping: bool = True, start_iter: int = 0):
        self.dataset = dataset
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = int(seed)
        self.grouping = aspect_ratio_grouping
        self.start_iter = start_iter
        self.rank = comm.get_rank()
        self._portrait = np.array([d.get("height", 1) > d.get("width", 0) for d in dataset])

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
            yield [self.mapper(self.dataset[idx]) for idx in indices]


def build_resumable_train_loader(cfg, mapper: Callable, start_iter: int = 0, dataset: Optional[List[Dict]] = None) -> DataLoader:
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
        dataset, mapper, build_index_sampler(cfg, dataset, seed), total // world, seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, start_iter=start_iter,
    )
    return DataLoader(stream, batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS,
                      collate_fn=_identity, persistent_workers=False)


def _identity(batch):
    # Batches are already lists of dicts; a module-level function pickles into workers.
    return batch
