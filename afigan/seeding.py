"""The one owner of the global RNG seeds (Python, NumPy, torch) during training.

Training randomness is a pure function of (SEED, iteration, rank, stream), so a resumed run
repeats an uninterrupted one exactly: the ``DATA`` stream seeds each batch's augmentations (in
the loader, possibly inside a worker process), the ``MODEL`` stream seeds each step's sampling
inside the model (RPN / RoI sampling, drop path), set by the trainers' per-iteration hook.
"""

import random

import numpy as np
import torch

__all__ = ["DATA", "MODEL", "seed_all_rngs"]

DATA = 0
MODEL = 1


def seed_all_rngs(seed: int, iteration: int, rank: int, stream: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from (seed, iteration, rank, stream)."""
    state = np.random.SeedSequence([max(int(seed), 0), int(iteration), int(rank), int(stream)]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    torch.manual_seed(int(state[1]))
