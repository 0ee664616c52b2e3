import json
import os

import pytest
import torch

# Warnings raised inside third-party code (torch, numpy 2 via pycocotools and Detectron2's COCO
# evaluator, timm, Detectron2's logger) that afigan cannot fix; everything else stays visible.
THIRD_PARTY_WARNINGS = (
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:The 'warn' method is deprecated, use 'warning' instead:DeprecationWarning",
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:Importing from timm.models.layers is deprecated:FutureWarning",
    "ignore:torch.meshgrid.* indexing argument:UserWarning",
)


def pytest_configure(config):
    for line in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LISTINGS = os.path.join(FIXTURES, "official_state_dicts")


def load_listing(name: str) -> dict:
    """Key -> shape listing of a reference-implementation state dict (copied from shared/reference)."""
    with open(os.path.join(LISTINGS, name)) as f:
        return json.load(f)


def random_state_dict(listing: dict, seed: int = 0) -> dict:
    """Random tensors with the listed shapes (integer zero for num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in listing["state_dict_shapes"].items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
        else:
            out[key] = torch.randn(*shape, generator=g) if shape else torch.randn((), generator=g)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
