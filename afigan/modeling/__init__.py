"""Detectron2 components of afigan; importing this module registers them."""
from . import necks  # noqa: F401
from . import backbones  # noqa: F401
