"""Checking a state dict against a module before loading, with one clear sentence on failure."""

from typing import Mapping

import torch
from torch import nn

__all__ = ["check_state_dict_fits", "ClearStateDictErrors"]


def check_state_dict_fits(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, what: str = "model"
) -> None:
    """Raise ValueError naming the first key whose shape differs (or, if ``strict``, the first
    missing or unexpected key). PyTorch's own message lists every key at once and buries the cause."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(getattr(value, "shape", ())):
            raise ValueError(
                f"Cannot load {what}: key {key!r} has shape {list(value.shape)} in the checkpoint "
                f"but {list(own[key].shape)} in the model."
            )
    if strict:
        for key in own:
            if key not in state_dict:
                raise ValueError(f"Cannot load {what}: key {key!r} is missing from the checkpoint.")
        for key in state_dict:
            if key not in own:
                raise ValueError(f"Cannot load {what}: the checkpoint has unexpected key {key!r}.")


class ClearStateDictErrors:
    """Mixin for ``nn.Module``s: ``load_state_dict`` first names the first key or shape that
    does not fit (see :func:`check_state_dict_fits`), then loads as usual."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        check_state_dict_fits(self, state_dict, strict=strict, what=type(self).__name__)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
