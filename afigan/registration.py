"""Imported by ``afigan/__init__`` when Detectron2 is present: fills Detectron2's registries
(backbones, necks, meta-architectures, heads) and data catalogs, so configs naming afigan
components build without "not found in registry" errors."""

from . import modeling  # noqa: F401
from .data import datasets  # noqa: F401
