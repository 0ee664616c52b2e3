"""Loading and saving afigan checkpoints: stage outputs, released weights, interpolator extraction.

* :class:`AFICheckpointer` is Detectron2's ``DetectionCheckpointer`` with three changes: files are
  written atomically (its path manager writes a temporary file and renames it, so a kill never
  leaves a truncated checkpoint or ``last_checkpoint``); a
  missing file is one clear error; and a stand-alone upsampler file (stage-1 ``G_0``: AFI's
  ``Generators.*`` keys, or any kind tagged by :class:`UpsamplerTag`) given as model weights
  lands in the neck's ``srf_module`` / ``srf_modules``. Checkpoints in the
  reference layout (released AFI-GAN weights) load directly: module names are the reference's.
* :func:`load_interpolator_weights` copies only the interpolator tensors from a stage-1 G file,
  a stage-2 AF-extractor checkpoint or a released/stage-3 detector into a model's ``srf_module``
  (or per-level ``srf_modules``), for every kind of the upsampler registry.
"""

import contextlib
import errno
import glob
import logging
import os
import pickle
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from afigan.layers import build_upsampler, upsampler_kinds

__all__ = [
    "SRF_PREFIX",
    "read_checkpoint",
    "extract_interpolator_state",
    "find_interpolators",
    "fit_interpolator_state",
    "guess_upsampler_kind",
    "UpsamplerTag",
    "UPSAMPLER_TAG",
    "load_interpolator_weights",
    "atomic_open",
    "AtomicLocalWrites",
    "AFICheckpointer",
    "expect_partial_load",
]

logger = logging.getLogger(__name__)
SRF_PREFIX = "backbone.srf_module."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed, synced and
    renamed over ``path``, on any exception (a kill included) it is removed and ``path`` is
    untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A process killed (SIGKILL) while writing ``path`` left its temporary file behind: drop it now.
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape("." + os.path.basename(path)) + ".*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicLocalWrites:
    """A path manager whose writes to local files go through :func:`atomic_open`; everything else
    (reads, remote paths, ``exists``, ``rm``, ...) is the wrapped path manager's."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in path:
            return atomic_open(path, mode)
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


UPSAMPLER_TAG = "upsampler"  # checkpoint entry naming what a stand-alone upsampler file (stage-1 G) holds


class UpsamplerTag:
    """A checkpointable (``state_dict`` / ``load_state_dict``) that writes ``{"kind", "shared"}``
    into every checkpoint of a stand-alone upsampler, so a later load knows what the file holds
    (only AFI's ``Generators.*`` keys name their kind) and a resume with another
    ``MODEL.AFI.INTERP`` / ``SHARED`` stops with one sentence."""

    def __init__(self, kind: str, shared: bool):
        self.kind, self.shared = kind, bool(shared)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "shared": self.shared}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind or bool(state.get("shared", True)) != self.shared:
            raise ValueError(
                f"The checkpoint holds a {_describe(state.get('kind'), state.get('shared', True))} upsampler "
                "but the config "
                f"asks for a {_describe(self.kind, self.shared)} one; resume with the MODEL.AFI.INTERP / "
                "MODEL.AFI.SHARED "
                f"it was trained with, or start in a new OUTPUT_DIR."
            )


def _describe(kind, shared) -> str:
    return f"{'shared' if shared else 'per-level'} {kind!r}"


def extract_interpolator_state(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Optional[bool]]:
    """Upsampler tensors of any supported layout and whether they form ONE shared upsampler.

    ``checkpoint`` is a checkpoint dict (``{"model": ..., ...}``) or a bare state dict. Accepted:
    a stand-alone upsampler (stage-1 G: tagged by :class:`UpsamplerTag`, or untagged AFI
    ``Generators.*``), a detector with a shared ``*.srf_module.*`` or per-level
    ``*.srf_modules.<level>.*`` upsampler, with or without DDP's ``module.`` prefix. Returns
    ``(state, shared)``: keys relative to the upsampler (shared) or ``<level>.<key>`` (per
    level); ``({}, None)`` when there is no upsampler.
    """
    model = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    tag = checkpoint.get(UPSAMPLER_TAG)
    if isinstance(tag, Mapping) and "kind" in tag:
        return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in model.items()}, bool(
            tag.get("shared", True)
        )
    shared, per_level = {}, {}
    for key, value in model.items():
        dotted = f".{key}"
        if ".srf_modules." in dotted:
            per_level[dotted.split(".srf_modules.", 1)[1]] = value
        elif ".srf_module." in dotted:
            shared[dotted.split(".srf_module.", 1)[1]] = value
        elif key.startswith("Generators.") or key.startswith("module.Generators."):
            shared[key[key.index("Generators.") :]] = value
    if per_level:
        return per_level, False
    return (shared, True) if shared else ({}, None)


def _is_upsampler(module: nn.Module) -> bool:
    # The registry's upsamplers all live in afigan.layers; a bare ModuleDict is stage 1's per-level G.
    return type(module).__module__.startswith("afigan.layers") or type(module) is nn.ModuleDict


def find_interpolators(model: nn.Module) -> List[Tuple[str, nn.Module, bool]]:
    """``(name, module, shared)`` of every neck upsampler of ``model``: each ``srf_module``
    (shared=True) and each ``srf_modules`` ModuleDict (per level); the model itself when it is
    a stand-alone upsampler (or stage 1's per-level ModuleDict of them)."""
    model = getattr(model, "module", model)  # DDP
    found = []
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        if last == "srf_module":
            found.append((name, module, True))
        elif last == "srf_modules" and isinstance(module, nn.ModuleDict):
            found.append((name, module, False))
    if not found and _is_upsampler(model):
        found.append(("", model, type(model) is not nn.ModuleDict))
    return found


def guess_upsampler_kind(keys) -> Optional[str]:
    """The registered kind whose module names (first key parts) best match ``keys``, or None."""
    names = {k.split(".")[0] for k in keys}
    best, best_overlap = None, 0
    for kind in upsampler_kinds():
        try:
            own = {k.split(".")[0] for k in build_upsampler(kind, 16).state_dict()}
        except (TypeError, ValueError):  # a kind that cannot be built at 16 channels with its defaults
            continue
        overlap = len(own & names)
        if overlap > best_overlap:
            best, best_overlap = kind, overlap
    return best


def fit_interpolator_state(
    state: Mapping[str, torch.Tensor],
    shared: bool,
    module: nn.Module,
    module_shared: bool,
    what: str,
    path: str,
    prefix: str = "",
) -> Dict[str, torch.Tensor]:
    """``state`` (from :func:`extract_interpolator_state`) arranged as ``module.state_dict()``:
    a shared upsampler initialises every level of a per-level ``module``; levels of the file that
    ``module`` has no step for are left out. One-sentence ValueError when it does not fit."""
    own = module.state_dict()
    if not own:
        raise ValueError(
            f"{what}: the model's {prefix.rstrip('.') or 'upsampler'} has no parameters (a nearest or "
            f"bilinear MODEL.AFI.INTERP), so the upsampler weights in {path!r} cannot be used."
        )
    if shared and not module_shared:
        src = {f"{level}.{k}": v for level in module.keys() for k, v in state.items()}
    elif not shared and module_shared:
        levels = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"{what}: {path!r} holds one upsampler per level {levels}, but the model's "
            f"{prefix.rstrip('.') or 'upsampler'} "
            f"is one shared upsampler; set MODEL.AFI.SHARED False to load it."
        )
    else:
        src = dict(state)
        if not module_shared:
            src = {k: v for k, v in src.items() if k.split(".")[0] in module.keys()}
    if not set(own) & set(src):
        # Compare one upsampler's own key names: per-level keys carry a "<level>." prefix.
        one = module if module_shared else next(iter(module.values()))
        kind = guess_upsampler_kind(k if module_shared else k.split(".", 1)[1] for k in src) if src else None
        held = f"a {kind!r} upsampler" if kind else "an upsampler of another kind"
        raise ValueError(
            f"{what}: {path!r} holds {held}, which does not fit the model's {type(one).__name__}; "
            f"set MODEL.AFI.INTERP to the kind it was trained with (one of {upsampler_kinds()})."
        )
    for key, value in own.items():
        if key not in src:
            raise ValueError(f"{what}: {path!r} lacks interpolator tensor {key!r} (needed for {prefix}{key}).")
        if tuple(src[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{what}: interpolator tensor {key!r} in {path!r} has shape {list(src[key].shape)}, "
                f"but {prefix}{key} expects {list(value.shape)} (check MODEL.FPN.OUT_CHANNELS and MODEL.AFI.*)."
            )
    extra = sorted(set(src) - set(own))
    if extra:
        raise ValueError(
            f"{what}: {path!r} has interpolator tensor {extra[0]!r} that {prefix.rstrip('.') or 'the model'} "
            "does not have."
        )
    return src


def load_interpolator_weights(model: nn.Module, path: str, what: str = "MODEL.AF_EXTRACTOR_WEIGHTS") -> List[str]:
    """Copy the upsampler tensors of checkpoint ``path`` into every ``srf_module`` /
    ``srf_modules`` of ``model`` (any registered kind).

    Nothing else of the model changes. Returns the names of the loaded model keys. Raises a
    one-sentence error (naming ``what``, the path or the key) when the file is missing, has no
    upsampler tensors, holds another kind, or a tensor's shape does not fit.
    """
    state, shared = extract_interpolator_state(read_checkpoint(path, what))
    targets = find_interpolators(model)
    if not targets:
        raise ValueError(
            f"{what}: the model has no upsampler ('srf_module' or 'srf_modules') to load {path!r} into; "
            f"build it with an afigan neck (e.g. build_resnet_fpn_sr_backbone)."
        )
    loaded = []
    for name, module, module_shared in targets:
        prefix = f"{name}." if name else ""
        if not state and module.state_dict():
            raise ValueError(
                f"{what}: {path!r} contains no interpolator tensors (no 'srf_module.' or 'Generators.' keys)."
            )
        src = fit_interpolator_state(state, shared, module, module_shared, what, path, prefix)
        with torch.no_grad():
            for key, value in module.state_dict().items():
                value.copy_(src[key])
        loaded += [prefix + k for k in src]
    logger.info(
        "Loaded %d upsampler tensors from %s into %s.", len(loaded), path, [n or "model" for n, _, _ in targets]
    )
    return loaded


_PARTIAL = []  # the active expect_partial_load declarations, innermost last


@contextlib.contextmanager
def expect_partial_load(what: str, missing_ok=(), unused_ok=()):
    """Declare the loads inside the block partial on purpose: model tensors whose names start
    with a ``missing_ok`` prefix may stay at their initialisation and checkpoint tensors under an
    ``unused_ok`` prefix may go unused ("" = any). Such a load logs one line (what was loaded from
    where, what stayed at its initialisation) instead of fvcore's lists of keys; any other
    mismatch still gets fvcore's warnings."""
    _PARTIAL.append((what, tuple(missing_ok), tuple(unused_ok)))
    try:
        yield
    finally:
        _PARTIAL.pop()


def _groups(keys, depth: int = 2) -> str:
    """'backbone.srf_module.* (12)'-style summary of key names by their first ``depth`` parts."""
    counts = {}
    for k in keys:
        g = ".".join(k.split(".")[:depth])
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in sorted(counts.items())) or "none"


class AFICheckpointer(DetectionCheckpointer):
    """Detectron2's DetectionCheckpointer with atomic saves, one-sentence errors for a missing
    file or a wrong-shaped interpolator tensor, and stand-alone interpolator files (keys
    ``Generators.*``) mapped into the model's ``srf_module``. Same constructor and methods."""

    last_incompatible = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # fvcore's save() and tag_last_checkpoint() write through the path manager.
        self.path_manager = AtomicLocalWrites(self.path_manager)

    def load(self, path: str, *args, **kwargs):
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"Checkpoint file {path!r} does not exist; check MODEL.WEIGHTS (or the last_checkpoint file for "
                "--resume)."
            )
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:  # noqa: BLE001 - torch.load / pickle raise many types for a damaged file
            raise ValueError(
                f"Checkpoint {filename!r} cannot be read ({type(e).__name__}: {_first_sentence(e)}); "
                f"it is truncated or not a checkpoint: write it again or give another file."
            ) from None

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if last and "://" not in last and not os.path.isfile(last):
                raise FileNotFoundError(
                    f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} names "
                    f"{os.path.basename(last)!r}, which "
                    "does not exist; write the name of an existing model_*.pth of that folder into it, or "
                    "delete it to "
                    f"start again."
                )
        return super().resume_or_load(path, resume=resume)

    def save(self, name: str, **kwargs):
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

    def _log_incompatible_keys(self, incompatible) -> None:
        if getattr(self, "_interpolator_only", False):
            self._interpolator_only = False
            declared = ("the interpolator (a stand-alone G file)", ("",), ())
        elif _PARTIAL:
            declared = _PARTIAL[-1]
        else:
            return super()._log_incompatible_keys(incompatible)
        what, missing_ok, unused_ok = declared
        missing = list(incompatible.missing_keys)
        unused = list(incompatible.unexpected_keys)
        accidental = [k for k in missing if not (missing_ok and k.startswith(missing_ok))]
        accidental += [k for k in unused if not (unused_ok and k.startswith(unused_ok))]
        if incompatible.incorrect_shapes or accidental:
            return super()._log_incompatible_keys(incompatible)  # partial by accident: fvcore's loud lists
        total = len(self.model.state_dict())
        logger.info(
            "Loaded %d of %d tensors of %s from %s; left at their initialisation: %s; not used from the file: %s.",
            total - len(missing),
            total,
            what,
            getattr(self, "_loading", "?"),
            _groups(missing),
            _groups(unused, 1),
        )

    def _load_model(self, checkpoint):
        model_sd = checkpoint["model"]
        own = self.model.state_dict()
        # Resuming a stand-alone upsampler: a file of another kind stops here, before fvcore
        # would report its keys and then fail on the optimizer's parameter groups.
        if UPSAMPLER_TAG in self.checkpointables and isinstance(checkpoint.get(UPSAMPLER_TAG), Mapping):
            self.checkpointables[UPSAMPLER_TAG].load_state_dict(checkpoint[UPSAMPLER_TAG])
        # A stand-alone upsampler (stage-1 G) given as model weights: put it where it belongs.
        tagged = isinstance(checkpoint.get(UPSAMPLER_TAG), Mapping)
        untagged_afi = bool(model_sd) and all(k.startswith("Generators.") for k in model_sd)
        targets = [t for t in find_interpolators(self.model) if t[0]]
        if (tagged or untagged_afi) and targets:
            state, shared = extract_interpolator_state(checkpoint)
            model_sd = {}
            for name, module, module_shared in targets:
                fitted = fit_interpolator_state(
                    state, shared, module, module_shared, "MODEL.WEIGHTS", getattr(self, "_loading", "?"), f"{name}."
                )
                model_sd.update({f"{name}.{k}": v for k, v in fitted.items()})
            checkpoint["model"] = model_sd
            checkpoint.pop(UPSAMPLER_TAG, None)
            self._interpolator_only = True  # everything but the interpolator stays as it is, on purpose
        # A wrong-shaped interpolator tensor is a configuration error, not something to skip.
        for key, value in model_sd.items():
            if "srf_module" in key and key in own and tuple(np.shape(value)) != tuple(own[key].shape):
                raise ValueError(
                    f"Checkpoint tensor {key!r} has shape {list(np.shape(value))} but the model expects "
                    f"{list(own[key].shape)} (check MODEL.FPN.OUT_CHANNELS and MODEL.AFI.*)."
                )
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible
