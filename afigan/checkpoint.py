"""Loading and saving afigan checkpoints: stage outputs, released weights, interpolator extraction.

* :class:`AFICheckpointer` is Detectron2's ``DetectionCheckpointer`` with these changes: files are
  written atomically (through :func:`afigan.io.atomic_open`, so a kill never leaves a truncated
  checkpoint or ``last_checkpoint``); every checkpoint of a model that holds an upsampler records
  its kind and layout (:data:`UPSAMPLER_TAG`), and a load whose file names another kind or layout
  stops with one sentence naming both; a missing or unreadable file is one clear error; a
  stand-alone upsampler file (stage-1 ``G_0``) given as model weights lands in the neck's
  ``srf_module`` / ``srf_modules``; and a load the caller declares partial (``partial=``) logs one
  line instead of fvcore's key lists. Checkpoints in the reference layout (released AFI-GAN
  weights) load directly: module names are the reference's.
* :func:`load_interpolator_weights` copies only the interpolator tensors from a stage-1 G file,
  a stage-2 AF-extractor checkpoint or a released/stage-3 detector into a model's ``srf_module``
  (or per-level ``srf_modules``), for every kind of the upsampler registry.

Files written before checkpoints carried the tag (and released weights) still load; a kind
mismatch with such a file is worded without the file's kind, which is never guessed from key names.
"""

import errno
import logging
import os
import pickle
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from afigan.io import atomic_open
from afigan.layers.interpolator_state import (
    UPSAMPLER_TAG,
    InterpolatorState,
    describe_tag,
    extract_interpolator_state,
    file_tag,
    find_interpolators,
    fit_interpolator_state,
    is_standalone,
    upsampler_tag,
)

__all__ = [
    "SRF_PREFIX",
    "read_checkpoint",
    "InterpolatorState",
    "extract_interpolator_state",
    "find_interpolators",
    "fit_interpolator_state",
    "UPSAMPLER_TAG",
    "upsampler_tag",
    "load_interpolator_weights",
    "AtomicLocalWrites",
    "PartialLoad",
    "AFICheckpointer",
]

logger = logging.getLogger(__name__)
SRF_PREFIX = "backbone.srf_module."


class AtomicLocalWrites:
    """A path manager whose writes to local files go through :func:`afigan.io.atomic_open`;
    everything else (reads, remote paths, ``exists``, ``rm``, ...) is the wrapped path manager's."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in path:
            return atomic_open(path, mode)  # this module's name, so a test can wrap it
        return self._path_manager.open(path, mode, **kwargs)


def _first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message, on one line (torch.load's run on)."""
    return " ".join(str(e).split()).split(". ")[0].rstrip(".")


def read_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """Read a ``.pth`` / ``.pkl`` (Detectron2 zoo) file into ``{"model": state_dict, ...}``.

    ``what`` names the config key or role in the error raised when the file is missing or
    unreadable, e.g. ``"MODEL.AF_EXTRACTOR_WEIGHTS"``.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: file {path!r} does not exist; give the path of an existing .pth or .pkl file."
        )
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(
            f"{what}: cannot read {path!r} as a checkpoint ({type(e).__name__}: {_first_sentence(e)}); "
            f"it is truncated or not a checkpoint: write it again or give another file."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path!r} holds a {type(data).__name__}, not a state dict or checkpoint dict.")
    if "model" not in data:
        data = {"model": data}
    data["model"] = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in data["model"].items()}
    return data


def load_interpolator_weights(model: nn.Module, path: str, what: str = "MODEL.AF_EXTRACTOR_WEIGHTS") -> List[str]:
    """Copy the upsampler tensors of checkpoint ``path`` into every ``srf_module`` /
    ``srf_modules`` of ``model`` (any registered kind).

    Nothing else of the model changes. Returns the names of the loaded model keys. Raises a
    one-sentence error (naming ``what``, the path or the key) when the file is missing, has no
    upsampler tensors, holds another kind, or a tensor's shape does not fit.
    """
    found = extract_interpolator_state(read_checkpoint(path, what))
    targets = find_interpolators(model)
    if not targets:
        raise ValueError(
            f"{what}: the model has no upsampler ('srf_module' or 'srf_modules') to load {path!r} into; "
            f"build it with an afigan neck (e.g. build_resnet_fpn_sr_backbone)."
        )
    loaded = []
    for name, module, module_shared in targets:
        prefix = f"{name}." if name else ""
        if not found.state and module.state_dict():
            raise ValueError(
                f"{what}: {path!r} contains no interpolator tensors (no 'srf_module.' or 'Generators.' keys)."
            )
        src = fit_interpolator_state(found, module, module_shared, what, path, prefix)
        with torch.no_grad():
            for key, value in module.state_dict().items():
                value.copy_(src[key])
        loaded += [prefix + k for k in src]
    logger.info(
        "Loaded %d upsampler tensors from %s into %s.", len(loaded), path, [n or "model" for n, _, _ in targets]
    )
    return loaded


class PartialLoad(NamedTuple):
    """What a load leaves out on purpose (``AFICheckpointer.load(..., partial=PartialLoad(...))``):
    model tensors whose names start with a ``missing_ok`` prefix may stay at their initialisation
    and file tensors under an ``unused_ok`` prefix may go unused ("" = any). ``what`` names the
    model in the one line logged instead of fvcore's key lists; any other mismatch still gets
    fvcore's warnings."""

    what: str
    missing_ok: Sequence[str] = ()
    unused_ok: Sequence[str] = ()


class _Incompatible(NamedTuple):
    """fvcore's incompatible keys, and what the load expected when the file itself says so (a
    stand-alone upsampler file: everything but the upsampler stays as it was)."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    incorrect_shapes: List[Tuple[str, Tuple[int], Tuple[int]]]
    expected: Optional[PartialLoad] = None


def _groups(keys, depth: int = 2) -> str:
    """'backbone.srf_module.* (12)'-style summary of key names by their first ``depth`` parts."""
    counts = {}
    for k in keys:
        g = ".".join(k.split(".")[:depth])
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in sorted(counts.items())) or "none"


def _covers(prefixes: Sequence[str], key: str) -> bool:
    return bool(prefixes) and key.startswith(tuple(prefixes))


class AFICheckpointer(DetectionCheckpointer):
    """Detectron2's DetectionCheckpointer with atomic saves, the upsampler tag, one-sentence
    errors for a missing file, another upsampler kind or a wrong-shaped interpolator tensor, and
    stand-alone interpolator files mapped into the model's ``srf_module``. Same constructor and
    methods; :meth:`load` also takes ``partial=``. ``last_incompatible``: the incompatible keys
    of the last load."""

    last_incompatible = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # fvcore's save() and tag_last_checkpoint() write through the path manager.
        self.path_manager = AtomicLocalWrites(self.path_manager)
        self._expected: Optional[PartialLoad] = None
        self._path = "?"

    def load(self, path: str, checkpointables=None, *, partial: Optional[PartialLoad] = None):
        """fvcore's ``load``; ``partial`` declares the load partial on purpose (:class:`PartialLoad`)."""
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"Checkpoint file {path!r} does not exist; check MODEL.WEIGHTS (or the last_checkpoint file for "
                "--resume)."
            )
        # fvcore's load() calls the private hooks below with the checkpoint alone: this call's
        # arguments live on the instance for its duration only (as Detectron2 keeps the parsed URL).
        self._expected, self._path = partial, path
        try:
            return super().load(path, checkpointables)
        finally:
            self._expected, self._path = None, "?"

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if last and "://" not in last and not os.path.isfile(last):
                raise FileNotFoundError(
                    f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} names "
                    f"{os.path.basename(last)!r}, which does not exist; write the name of an existing model_*.pth "
                    "of that folder into it, or delete it to start again."
                )
        return super().resume_or_load(path, resume=resume)

    def save(self, name: str, **kwargs):
        tag = upsampler_tag(self.model)
        if tag is not None:
            kwargs.setdefault(UPSAMPLER_TAG, tag)
        try:
            return super().save(name, **kwargs)
        except OSError as e:
            # atomic_open removed its temporary file: the previous checkpoint and last_checkpoint are untouched.
            last = self.get_checkpoint_file() if self.has_checkpoint() else ""
            kept = f"the previous checkpoint {last!r} is intact" if last else "no earlier checkpoint exists"
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise OSError(
                e.errno,
                f"Cannot write checkpoint {os.path.join(self.save_dir, name + '.pth')!r} ({reason}); "
                f"{kept}: free space or choose another OUTPUT_DIR, then resume with --resume.",
            ) from None

    # Private fvcore hooks, overridden because fvcore offers no public ones: _load_file is its
    # documented place for reading a file; _load_model is where Detectron2 itself adapts a
    # checkpoint to the model; _log_incompatible_keys is the only place its key lists are logged.

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:  # noqa: BLE001 - torch.load / pickle raise many types for a damaged file
            raise ValueError(
                f"Checkpoint {filename!r} cannot be read ({type(e).__name__}: {_first_sentence(e)}); "
                f"it is truncated or not a checkpoint: write it again or give another file."
            ) from None

    def _log_incompatible_keys(self, incompatible) -> None:
        expected = getattr(incompatible, "expected", None) or self._expected
        if expected is None:
            return super()._log_incompatible_keys(incompatible)
        missing, unused = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
        accidental = [k for k in missing if not _covers(expected.missing_ok, k)]
        accidental += [k for k in unused if not _covers(expected.unused_ok, k)]
        if incompatible.incorrect_shapes or accidental:
            return super()._log_incompatible_keys(incompatible)  # partial by accident: fvcore's loud lists
        total = len(self.model.state_dict())
        logger.info(
            "Loaded %d of %d tensors of %s from %s; left at their initialisation: %s; not used from the file: %s.",
            total - len(missing),
            total,
            expected.what,
            self._path,
            _groups(missing),
            _groups(unused, 1),
        )

    def _check_tag(self, checkpoint) -> None:
        """A file whose tag names another upsampler kind or layout than the model's stops here,
        before fvcore reports its keys (and, resuming, fails on the optimizer's parameter groups)."""
        theirs, ours = file_tag(checkpoint), upsampler_tag(self.model)
        if theirs is None or ours is None:
            return
        named = [name for name, _, _ in find_interpolators(self.model) if name]
        if self._expected and named and all(_covers(self._expected.missing_ok, f"{n}.") for n in named):
            return  # the caller takes the upsampler from another file
        kinds_differ = theirs.get("kind") and ours["kind"] and theirs["kind"] != ours["kind"]
        if kinds_differ or bool(theirs.get("shared", True)) != ours["shared"]:
            raise ValueError(
                f"{self._path!r} holds a {describe_tag(theirs)} upsampler but the config asks for a "
                f"{describe_tag(ours)} one; use the MODEL.AFI.INTERP / MODEL.AFI.SHARED it was trained with "
                "(resuming: or start in a new OUTPUT_DIR)."
            )

    def _load_model(self, checkpoint):
        expected = None
        targets = [t for t in find_interpolators(self.model) if t[0]]
        if targets and is_standalone(checkpoint):
            # A stand-alone upsampler (stage-1 G) given as model weights: put it where it belongs.
            found = extract_interpolator_state(checkpoint)
            model_sd = {}
            for name, module, module_shared in targets:
                fitted = fit_interpolator_state(found, module, module_shared, "MODEL.WEIGHTS", self._path, f"{name}.")
                model_sd.update({f"{name}.{k}": v for k, v in fitted.items()})
            checkpoint["model"] = model_sd
            checkpoint.pop(UPSAMPLER_TAG, None)
            expected = PartialLoad("the interpolator (a stand-alone G file)", ("",), ())
        else:
            self._check_tag(checkpoint)
        own = self.model.state_dict()
        # A wrong-shaped interpolator tensor is a configuration error, not something to skip.
        for key, value in checkpoint["model"].items():
            if "srf_module" in key and key in own and tuple(np.shape(value)) != tuple(own[key].shape):
                raise ValueError(
                    f"Checkpoint tensor {key!r} has shape {list(np.shape(value))} but the model expects "
                    f"{list(own[key].shape)} (check MODEL.FPN.OUT_CHANNELS and MODEL.AFI.*)."
                )
        incompatible = _Incompatible(*super()._load_model(checkpoint), expected=expected)
        self.last_incompatible = incompatible
        return incompatible
