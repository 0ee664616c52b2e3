"""A CPU check of device placement: tensors that code creates without naming a device.

On a GPU, ``torch.zeros(shape)`` inside ``forward`` lands on the CPU and the next operation that
mixes it with the CUDA input fails. On a CPU-only machine nothing fails: every tensor is on the
CPU. The guard makes such a tensor visible here. Inside :func:`stray_tensors_on_meta`, a tensor
factory (``torch.zeros``, ``torch.arange``, ``torch.tensor``, ... : torch's own list of device
constructors) called *from the guarded source files* without ``device=`` makes a ``meta`` tensor,
while the weights and inputs stay on the CPU; the first operation mixing the two raises
``RuntimeError: Tensor on device meta is not on the expected device cpu!`` (or, for
``.to(device)`` / ``.item()`` of it, "Cannot copy out of meta tensor" / "cannot be called on meta
tensors"): the same line that would fail, or copy through the host, on a GPU.

It is ``torch.device("meta")`` as the default device (a ``TorchFunctionMode``), limited by the
caller's file: by default only afigan's sources are guarded, because Detectron2's own code creates
host tensors on purpose (``ImageList.from_tensors`` stacks the image sizes on the CPU and calls
``.item()``, ``convert_boxes_to_pooler_format`` builds its sizes on the CPU and copies them over,
torchvision's ``batched_nms`` does ``torch.tensor(1).to(boxes)``), which the whole-process default
device ``meta`` trips over before any afigan line runs.

Indexing with a meta index tensor, which torch itself does not check, is refused here too. What it
cannot see: a stray tensor that never meets a CPU tensor (used for its shape only), and tensors
made in C++ (autograd's backward kernels), which never consult the default device.
"""

import contextlib
import os
import sys
from typing import Iterator, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import afigan

__all__ = ["META_ERRORS", "AFIGAN_SOURCES", "stray_tensors_on_meta"]

# What torch says when a meta tensor meets a CPU one, is copied or read (pytest.raises(match=)).
META_ERRORS = r"(not on the expected device|Cannot copy out of meta tensor|cannot be called on meta tensors)"
AFIGAN_SOURCES = os.path.dirname(os.path.abspath(afigan.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


class _StrayTensorsOnMeta(TorchFunctionMode):
    def __init__(self, sources: Sequence[str]):
        super().__init__()
        self.sources = tuple(sources)
        self.caught = 0  # factory calls sent to meta (how much the guard saw)

    def _caller_is_guarded(self) -> bool:
        frame = sys._getframe(2)  # above __torch_function__ and the mode's dispatch
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
            frame = frame.f_back  # torch's own Python wrappers are not the caller
        return frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(self.sources)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and self._caller_is_guarded():
            kwargs["device"] = torch.device("meta")
            self.caught += 1
        elif func in _INDEXING and args[0].device.type != "meta" and _has_meta(args[1]):
            # torch indexes a CPU tensor with a meta index without complaint (a CUDA tensor with a
            # CPU index, too, through a host-to-device copy): say it as a mixed-device op would.
            raise RuntimeError(f"Tensor on device meta is not on the expected device {args[0].device}! (an index)")
        return func(*args, **kwargs)


_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)


def _has_meta(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.device.type == "meta" for i in items)


@contextlib.contextmanager
def stray_tensors_on_meta(sources: Sequence[str] = (AFIGAN_SOURCES,)) -> Iterator[_StrayTensorsOnMeta]:
    """Inside: a tensor factory called without ``device=`` from a file under one of ``sources``
    (path prefixes; afigan's package by default) makes a meta tensor. Yields the mode (its
    ``caught`` counts those calls)."""
    mode = _StrayTensorsOnMeta([os.path.abspath(s) if not s.endswith(os.sep) else s for s in sources])
    with mode:
        yield mode
