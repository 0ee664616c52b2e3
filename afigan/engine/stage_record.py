"""The stale-settings rule: what a stage was started with, written beside its outputs, and the
comparison that decides whether a finished (or interrupted) stage may be reused.

A stage that starts fresh writes ``trained_with.json`` into its output folder: its effective
config (flattened, minus :data:`IGNORED_KEYS`) and a fingerprint (size and SHA-256) of every
checkpoint it starts from (:data:`INPUT_KEYS` naming a local file, plus inputs the pipeline names,
such as a pseudo-label file). Before a stage is skipped or resumed, the record a run would write is
compared with the one on disk; a difference stops the run with one sentence
(:class:`StaleStageError`). A resumed stage keeps the record it was checked against: the record
always describes how the stage *started*. A checkpoint is compared by content, not by path, so a
retrained earlier stage makes every later stage stale, and an output folder moved elsewhere does not.
"""

import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from afigan.config import flatten
from afigan.io import atomic_write_json

__all__ = [
    "RECORD_FILE",
    "IGNORED_KEYS",
    "INPUT_KEYS",
    "StaleStageError",
    "fingerprint",
    "make_record",
    "read_record",
    "write_record",
    "record_differences",
    "stale_sentence",
]

RECORD_FILE = "trained_with.json"
_VERSION = 1

# Keys that cannot change what a stage trains, so a change of them never makes a stage stale. The
# one list (the pipeline, the study and the tests read it here):
IGNORED_KEYS = frozenset(
    {
        # Where the stage writes: the record sits in that folder, and a moved folder stays valid.
        "OUTPUT_DIR",
        # CPU or GPU changes speed and float rounding, not the settings; a CUDA config run on a
        # machine without CUDA falls back to the CPU (afigan.config.device_fallback).
        "MODEL.DEVICE",
        # Loader processes: speed only.
        "DATALOADER.NUM_WORKERS",
        # How often checkpoints, evaluations, visualisations are written: the weights do not change.
        "SOLVER.CHECKPOINT_PERIOD",
        "TEST.EVAL_PERIOD",
        "VIS_PERIOD",
        # cuDNN's algorithm search: speed (and bit-level nondeterminism on GPUs) only.
        "CUDNN_BENCHMARK",
    }
)

# Config keys naming checkpoints a stage starts from: the stage table's inputs (afigan/engine/
# stages.py) and the weights a stage YAML may set itself. A key naming a local file is compared
# by the file's content; otherwise (empty, a URL, a model-zoo name) by its value, like any key.
INPUT_KEYS = (
    "MODEL.WEIGHTS",
    "MODEL.GUIDE_WEIGHTS",
    "MODEL.AFI_GEN_WEIGHTS",
    "MODEL.AFI_DIS_WEIGHTS",
    "MODEL.AF_EXTRACTOR_WEIGHTS",
)


class StaleStageError(ValueError):
    """A finished or interrupted stage was started with other settings than the current run's."""


# (absolute path, size, mtime_ns) -> sha256: a study fingerprints its teacher for every run.
_HASHES: Dict[Tuple[str, int, int], str] = {}


def fingerprint(path: str) -> Dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of the file at ``path`` (``{"missing": True}`` when
    there is none): what a stage that starts from it is compared by."""
    try:
        st = os.stat(path)
    except OSError:
        return {"missing": True}
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return {"size": st.st_size, "sha256": _HASHES[key]}


def _plain(value):
    """The value as JSON gives it back (tuples become lists), so a fresh config compares equal to
    one read from a record."""
    return json.loads(json.dumps(value, default=str))


def make_record(cfg, stage: str, extra_inputs: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The record of a stage about to start with ``cfg`` (a CfgNode or a flat dict):
    ``{"version", "stage", "config": {KEY: value}, "inputs": {KEY: {"path", "size", "sha256"}}}``.
    ``extra_inputs``: further files the stage reads, by a name of their own (e.g. pseudo-labels)."""
    flat = cfg if isinstance(cfg, dict) and not hasattr(cfg, "freeze") else flatten(cfg)
    config = {k: v for k, v in flat.items() if k not in IGNORED_KEYS}
    files = {k: config[k] for k in INPUT_KEYS if isinstance(config.get(k), str) and os.path.isfile(config[k])}
    files.update(extra_inputs or {})
    inputs = {name: dict(path=path, **fingerprint(path)) for name, path in files.items()}
    return _plain({"version": _VERSION, "stage": stage, "config": config, "inputs": inputs})


def _comparable(record: Mapping[str, Any]) -> Dict[str, Any]:
    """One flat ``{KEY: value}`` per record: an input file stands by its content, not its path."""
    inputs = record.get("inputs") or {}
    out = {k: v for k, v in (record.get("config") or {}).items() if k not in inputs and k not in IGNORED_KEYS}
    for name, fp in inputs.items():
        out[name] = {k: v for k, v in fp.items() if k != "path"}
    return out


def record_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``[(KEY, old, new)]`` of the keys and input files that differ between two records, in the new
    record's key order (keys only the old one has come last; a missing key has the value None)."""
    a, b = _comparable(old), _comparable(new)
    out = [(k, a.get(k), v) for k, v in b.items() if k not in a or a[k] != v]
    return out + [(k, v, None) for k, v in a.items() if k not in b]


def read_record(folder: str) -> Optional[Dict[str, Any]]:
    """The record in ``folder``, or None when it has none."""
    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_record(folder: str, record: Mapping[str, Any]) -> str:
    """Write ``record`` into ``folder`` atomically (a kill never leaves half a record); its path."""
    return atomic_write_json(os.path.join(folder, RECORD_FILE), record, indent=1)


def _show(value) -> str:
    if isinstance(value, dict):
        if value.get("missing"):
            return "<no file>"
        return f"<file of {value.get('size')} bytes, sha256 {str(value.get('sha256'))[:12]}>"
    if value is None:
        return "<unset>"
    if isinstance(value, list):  # a tuple in the config (JSON has lists): shown as it is written
        return str(tuple(value))
    return repr(value) if isinstance(value, str) else str(value)


def stale_sentence(what: str, folder: str, diffs: List[Tuple[str, Any, Any]], way_on: str, shown: int = 3) -> str:
    """One sentence: ``what`` in ``folder`` was started with other settings (the first ``shown``
    differences, old -> new), and the two ways on (a new --output-dir, or ``way_on``)."""
    listed = ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new in diffs[:shown])
    more = f" (and {len(diffs) - shown} more)" if len(diffs) > shown else ""
    return (
        f"{what} in {folder!r} was started with other settings than this run's: {listed}{more}; "
        f"give a new --output-dir, or {way_on}."
    )
