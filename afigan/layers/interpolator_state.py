"""Upsampler state surgery, pure PyTorch: find a model's upsamplers, say what kind and layout they
are (the tag every checkpoint of them records), and arrange upsampler tensors of one layout
(stand-alone stage-1 G, shared ``srf_module``, per-level ``srf_modules``) for another.

Used by :mod:`afigan.checkpoint` (loading and saving) and by everything above it. Errors are
one sentence naming the config key that decides the kind or layout (``MODEL.AFI.INTERP`` /
``SHARED``), since that is what a user changes to make a file fit.
"""

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .upsample import upsampler_kind_of, upsampler_kinds

__all__ = [
    "UPSAMPLER_TAG",
    "find_interpolators",
    "upsampler_tag",
    "file_tag",
    "describe_tag",
    "InterpolatorState",
    "is_standalone",
    "extract_interpolator_state",
    "fit_interpolator_state",
]

# Checkpoint entry {"kind": registry kind or None, "shared": one upsampler or one per level} that
# every checkpoint of a model with an upsampler carries (stage-1 G, stage-2 M, stage-3 detector).
UPSAMPLER_TAG = "upsampler"


def _is_upsampler(module: nn.Module) -> bool:
    # Built by the registry (it stamps the kind), or stage 1's per-level G: a ModuleDict of them.
    if isinstance(module, nn.ModuleDict):
        return len(module) > 0 and all(upsampler_kind_of(m) for m in module.values())
    return upsampler_kind_of(module) is not None


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
        found.append(("", model, not isinstance(model, nn.ModuleDict)))
    return found


def _one(module: nn.Module, shared: bool) -> nn.Module:
    """The upsampler itself: ``module``, or the first of a per-level ModuleDict."""
    return module if shared else next(iter(module.values()))


def upsampler_tag(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"kind", "shared"}`` of ``model``'s (first) upsampler, what its checkpoints record; None
    when it has none. ``kind`` is the registry kind the module was built as (None for a user's own)."""
    found = find_interpolators(model)
    if not found:
        return None
    _, module, shared = found[0]
    return {"kind": upsampler_kind_of(_one(module, shared)) if shared or len(module) else None, "shared": shared}


def file_tag(checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The checkpoint's :data:`UPSAMPLER_TAG` entry, or None (no upsampler, or written before tags)."""
    tag = checkpoint.get(UPSAMPLER_TAG)
    return tag if isinstance(tag, Mapping) and "kind" in tag else None


def describe_tag(tag: Mapping[str, Any]) -> str:
    """E.g. "shared 'afi'" or "per-level 'dysample'"; the layout alone when the kind is unknown."""
    layout = "shared" if tag.get("shared", True) else "per-level"
    return f"{layout} {tag['kind']!r}" if tag.get("kind") else layout


class InterpolatorState(NamedTuple):
    """The upsampler tensors of a checkpoint: ``state`` (keys relative to the upsampler, or
    ``<level>.<key>`` per level), ``shared`` (one upsampler, or one per level; None: no upsampler)
    and ``kind`` (from the checkpoint's tag; None for a file written before tags)."""

    state: Dict[str, torch.Tensor]
    shared: Optional[bool]
    kind: Optional[str]


def _strip_ddp(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def is_standalone(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the file holds a stand-alone upsampler (stage-1 G): tagged without neck keys, or
    the reference's untagged ``Generators.*``."""
    model = checkpoint.get("model") or {}
    if file_tag(checkpoint) is not None:
        return not any(".srf_module" in f".{k}" for k in model)
    return bool(model) and all(_strip_ddp(k).startswith("Generators.") for k in model)


def extract_interpolator_state(checkpoint: Mapping[str, Any]) -> InterpolatorState:
    """Upsampler tensors of any supported layout, whether they form ONE shared upsampler, and
    their kind.

    ``checkpoint`` is a checkpoint dict (``{"model": ..., ...}``) or a bare state dict. Accepted:
    a stand-alone upsampler (stage-1 G: tagged by :data:`UPSAMPLER_TAG`, or untagged AFI
    ``Generators.*``), a detector with a shared ``*.srf_module.*`` or per-level
    ``*.srf_modules.<level>.*`` upsampler, with or without DDP's ``module.`` prefix.
    ``({}, None, None)`` when there is no upsampler.
    """
    model = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    tag = file_tag(checkpoint)
    kind = tag.get("kind") if tag else None
    if is_standalone({"model": model, **({UPSAMPLER_TAG: tag} if tag else {})}):
        state = {_strip_ddp(k): v for k, v in model.items()}
        return InterpolatorState(state, bool(tag.get("shared", True)) if tag else True, kind)
    shared, per_level = {}, {}
    for key, value in model.items():
        dotted = f".{key}"
        if ".srf_modules." in dotted:
            per_level[dotted.split(".srf_modules.", 1)[1]] = value
        elif ".srf_module." in dotted:
            shared[dotted.split(".srf_module.", 1)[1]] = value
    if per_level:
        return InterpolatorState(per_level, False, kind)
    return InterpolatorState(shared, True, kind) if shared else InterpolatorState({}, None, None)


def fit_interpolator_state(
    found: InterpolatorState,
    module: nn.Module,
    module_shared: bool,
    what: str,
    path: str,
    prefix: str = "",
) -> Dict[str, torch.Tensor]:
    """``found`` (from :func:`extract_interpolator_state`) arranged as ``module.state_dict()``:
    a shared upsampler initialises every level of a per-level ``module``; levels of the file that
    ``module`` has no step for are left out. One-sentence ValueError when it does not fit: another
    kind (named from the file's tag and the module's own), another layout, a missing or extra
    tensor, another shape."""
    state, shared = found.state, found.shared
    where = prefix.rstrip(".") or "upsampler"
    own = module.state_dict()
    if not own:
        raise ValueError(
            f"{what}: the model's {where} has no parameters (a nearest or "
            f"bilinear MODEL.AFI.INTERP), so the upsampler weights in {path!r} cannot be used."
        )
    one = _one(module, module_shared)
    own_kind = upsampler_kind_of(one)
    if found.kind and own_kind and found.kind != own_kind:
        raise ValueError(
            f"{what}: {path!r} holds a {found.kind!r} upsampler, which does not fit the model's {own_kind!r}; "
            f"set MODEL.AFI.INTERP to the kind it was trained with ({found.kind!r}) or give a {own_kind!r} file."
        )
    if shared and not module_shared:
        src = {f"{level}.{k}": v for level in module.keys() for k, v in state.items()}
    elif not shared and module_shared:
        levels = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"{what}: {path!r} holds one upsampler per level {levels}, but the model's {where} "
            f"is one shared upsampler; set MODEL.AFI.SHARED False to load it."
        )
    else:
        src = dict(state)
        if not module_shared:
            src = {k: v for k, v in src.items() if k.split(".")[0] in module.keys()}
    if not set(own) & set(src):
        # No tag to name the file's kind (written before checkpoints carried one): say so, never guess.
        theirs = (
            f"a {found.kind!r} upsampler" if found.kind else "an upsampler of another kind (the file does not name it)"
        )
        ours = repr(own_kind) if own_kind else type(one).__name__
        raise ValueError(
            f"{what}: {path!r} holds {theirs}, which does not fit the model's {ours}; "
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
