"""Loading and saving afigan checkpoints: stage outputs, released weights, interpolator extraction.

* :class:`AFICheckpointer` is Detectron2's ``DetectionCheckpointer`` with three changes: files are
  written atomically (its path manager writes a temporary file and renames it, so a kill never
  leaves a truncated checkpoint or ``last_checkpoint``); a
  missing file is one clear error; and a stand-alone interpolator file (stage-1 ``G_0``, keys
  ``Generators.*``) given as model weights lands in ``backbone.srf_module``. Checkpoints in the
  reference layout (released AFI-GAN weights) load directly: module names are the reference's.
* :func:`load_interpolator_weights` copies only the interpolator tensors from a stage-1 G file,
  a stage-2 AF-extractor checkpoint or a released/stage-3 detector into a model's ``srf_module``.
"""
import contextlib
import logging
import os
import pickle
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from afigan.layers import AFInterpolator

__all__ = [
    "SRF_PREFIX",
    "read_checkpoint",
    "extract_interpolator_state",
    "find_interpolators",
    "load_interpolator_weights",
    "atomic_open",
    "AtomicLocalWrites",
    "AFICheckpointer",
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


def read_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """Read a ``.pth`` / ``.pkl`` (Detectron2 zoo) file into ``{"model": state_dict, ...}``.

    ``what`` names the config key or role in the error raised when the file is missing or
    unreadable, e.g. ``"MODEL.AF_EXTRACTOR_WEIGHTS"``.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file {path!r} does not exist; give the path of an existing .pth or .pkl file.")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(f"{what}: cannot read {path!r} as a checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path!r} holds a {type(data).__name__}, not a state dict or checkpoint dict.")
    if "model" not in data:
        data = {"model": data}
    data["model"] = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in data["model"].items()}
    return data


def extract_interpolator_state(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Interpolator tensors of any supported layout, keyed relative to the interpolator.

    Accepts a stand-alone interpolator (``Generators.*``), a detector (``backbone.srf_module.*``
    or any ``*.srf_module.*``), or a DDP-saved detector (``module.`` prefix). Returns ``{}`` when
    the state dict holds no interpolator.
    """
    out = {}
    for key, value in state_dict.items():
        if ".srf_module." in f".{key}":
            out[key.split("srf_module.", 1)[1]] = value
        elif key.startswith("Generators.") or key.startswith("module.Generators."):
            out[key[key.index("Generators."):]] = value
    return out


def find_interpolators(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every ``srf_module`` in ``model`` (the model itself if it is one)."""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, AFInterpolator):
        return [("", model)]
    return [(n, m) for n, m in model.named_modules() if n.split(".")[-1] == "srf_module"]


def load_interpolator_weights(model: nn.Module, path: str, what: str = "MODEL.AF_EXTRACTOR_WEIGHTS") -> List[str]:
    """Copy the interpolator tensors of checkpoint ``path`` into every ``srf_module`` of ``model``.

    Nothing else of the model changes. Returns the names of the loaded model keys. Raises a
    one-sentence error (naming ``what``, the path or the key) when the file is missing, has no
    interpolator tensors, or a tensor's shape does not fit.
    """
    state = extract_interpolator_state(read_checkpoint(path, what)["model"])
    targets = find_interpolators(model)
    if not targets:
        raise ValueError(f"{what}: the model has no 'srf_module' to load {path!r} into (is MODEL.AFI.INTERP 'afi'?).")
    loaded = []
    for name, module in targets:
        own = module.state_dict()
        if not own:
            raise ValueError(
                f"{what}: the model's {name or 'interpolator'} has no parameters (MODEL.AFI.INTERP is not 'afi'), "
                f"so the interpolator weights in {path!r} cannot be used."
            )
        if not state:
            raise ValueError(
                f"{what}: {path!r} contains no interpolator tensors (no 'srf_module.' or 'Generators.' keys)."
            )
        prefix = f"{name}." if name else ""
        for key, value in own.items():
            if key not in state:
                raise ValueError(f"{what}: {path!r} lacks interpolator tensor {key!r} (needed for {prefix}{key}).")
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"{what}: interpolator tensor {key!r} in {path!r} has shape {list(state[key].shape)}, "
                    f"but {prefix}{key} expects {list(value.shape)} (check MODEL.FPN.OUT_CHANNELS and MODEL.AFI.*)."
                )
        extra = sorted(set(state) - set(own))
        if extra:
            raise ValueError(f"{what}: {path!r} has interpolator tensor {extra[0]!r} that {prefix or 'the model'} does not have.")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])
        loaded += [prefix + k for k in own]
    logger.info("Loaded %d interpolator tensors from %s into %s.", len(loaded), path, [n or "model" for n, _ in targets])
    return loaded


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
            raise FileNotFoundError(f"Checkpoint file {path!r} does not exist (check MODEL.WEIGHTS or --resume).")
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        model_sd = checkpoint["model"]
        own = self.model.state_dict()
        # A stand-alone interpolator (stage-1 G) given as model weights: put it where it belongs.
        if model_sd and all(k.startswith("Generators.") for k in model_sd) and not any(k.startswith("Generators.") for k in own):
            targets = [n for n, _ in find_interpolators(self.model)]
            if targets:
                model_sd = {f"{targets[0]}.{k}" if targets[0] else k: v for k, v in model_sd.items()}
                checkpoint["model"] = model_sd
        # A wrong-shaped interpolator tensor is a configuration error, not something to skip.
        for key, value in model_sd.items():
            if "srf_module." in key and key in own and tuple(np.shape(value)) != tuple(own[key].shape):
                raise ValueError(
                    f"Checkpoint tensor {key!r} has shape {list(np.shape(value))} but the model expects "
                    f"{list(own[key].shape)} (check MODEL.FPN.OUT_CHANNELS and MODEL.AFI.*)."
                )
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible
