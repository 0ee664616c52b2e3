"""Idempotent helpers for adding config keys (used by every ``add_*_config`` of afigan)."""
from detectron2.config import CfgNode as CN

__all__ = ["set_default", "node"]


def set_default(parent: CN, key: str, value) -> None:
    """Add ``key`` unless present, so a second call keeps values already merged into the cfg."""
    if key not in parent:
        parent[key] = value


def node(parent: CN, key: str) -> CN:
    """The child node ``key`` of ``parent``, created empty if missing."""
    if key not in parent:
        parent[key] = CN()
    return parent[key]
