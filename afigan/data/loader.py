"""A training loader whose batch stream is a pure function of (seed, iteration, rank).

Detectron2's TrainingSampler restarts its shuffled stream when a job resumes, and its
augmentations draw from the global NumPy RNG, so a resumed run sees different data than an
uninterrupted one. Here batch ``i`` of rank ``r`` is always the same images with the same
augmentation draws: index batches are generated from a seeded permutation stream (with aspect
ratio grouping decided from the annotated image sizes, before any image is read), skipping to
``start_iter`` costs no image loading, and every batch's mapping runs under RNGs seeded from
(seed, iteration, rank). Workers take batches round-robin, and PyTorch's DataLoader returns
them in order, so the stream is also independent of ``DATALOADER.NUM_WORKERS``.
"""
import itertools
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data import DatasetCatalog, get_detection_dataset_dicts
from detectron2.utils import comm

__all__ = ["ResumableBatches", "build_resumable_train_loader", "check_dataset_names"]

logger = logging.getLogger(__name__)


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


class ResumableBatches(IterableDataset):
    """Infinite stream of mapped batches (lists of dicts) for one rank.

    Args:
        dataset: list of Detectron2 dataset dicts.
        mapper: callable dataset dict -> model input dict.
        batch_size: images per batch on this rank.
        seed: base seed of the index stream and the augmentation RNGs.
        aspect_ratio_grouping: batch only images that are all landscape or all portrait.
        rank, world_size: this rank's share of the stream (batch i of rank r is global batch
            i * world_size + r).
    ``start_iter`` may be set after construction, before iteration starts (trainers set it after
    loading a checkpoint).
    """

    def __init__(self, dataset: List[Dict], mapper: Callable, batch_size: int, seed: int = 0,
                 aspect_ratio_grouping: bool = True, rank: int = 0, world_size: int = 1, start_iter: int = 0):
        self.dataset = dataset
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = int(seed)
        self.grouping = aspect_ratio_grouping
        self.rank, self.world_size = rank, world_size
        self.start_iter = start_iter
        self._portrait = np.array([d.get("height", 1) > d.get("width", 0) for d in dataset])

    def _global_index_batches(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed)
        buckets = {False: [], True: []}
        plain: List[int] = []
        while True:
            for idx in torch.randperm(len(self.dataset), generator=g).tolist():
                if not self.grouping:
                    plain.append(idx)
                    if len(plain) == self.batch_size:
                        yield plain
                        plain = []
                    continue
                bucket = buckets[bool(self._portrait[idx])]
                bucket.append(idx)
                if len(bucket) == self.batch_size:
                    yield list(bucket)
                    bucket.clear()

    def index_batches(self) -> Iterator[List[int]]:
        """Index batches of this rank, starting at ``start_iter``."""
        stream = self._global_index_batches()
        own = itertools.islice(stream, self.rank, None, self.world_size)
        return itertools.islice(own, self.start_iter, None)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, indices in enumerate(self.index_batches()):
            if i % num_workers != worker:
                continue
            iteration = self.start_iter + i
            # Per-batch RNG state: the same batch gets the same augmentation draws on resume.
            state = np.random.SeedSequence([self.seed, iteration, self.rank]).generate_state(2)
            np.random.seed(int(state[0]))
            random.seed(int(state[1]))
            torch.manual_seed(int(state[1]))
            yield [self.mapper(self.dataset[idx]) for idx in indices]


def build_resumable_train_loader(cfg, mapper: Callable, start_iter: int = 0, dataset: Optional[List[Dict]] = None) -> DataLoader:
    """A DataLoader of :class:`ResumableBatches` from ``cfg.DATASETS.TRAIN``.

    Uses SOLVER.IMS_PER_BATCH (split over ranks), DATALOADER.{NUM_WORKERS,
    ASPECT_RATIO_GROUPING, FILTER_EMPTY_ANNOTATIONS} and SEED (0 when negative). The loader's
    ``.dataset`` is the ResumableBatches, whose ``start_iter`` a trainer may set after resuming.
    """
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes ({world}).")
    if dataset is None:
        check_dataset_names(cfg.DATASETS.TRAIN)
        try:
            dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        except AssertionError as e:
            raise ValueError(
                f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} gives no usable training image ({e}); "
                f"every image lacks a non-crowd box, or the data set is empty."
            ) from None
    stream = ResumableBatches(
        dataset, mapper, total // world, seed=max(cfg.SEED, 0),
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        rank=comm.get_rank(), world_size=world, start_iter=start_iter,
    )
    return DataLoader(stream, batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS,
                      collate_fn=_identity, persistent_workers=False)


def _identity(batch):
    # Batches are already lists of dicts; a module-level function pickles into workers.
    return batch
