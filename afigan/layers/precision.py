"""Float32 islands: the few steps of an upsampler that half precision cannot carry.

Under autocast (or with a half-precision module) most of an upsampler runs in float16 or
bfloat16 as it should. Two steps lose too much there: DySample's sampling positions (a pixel
coordinate near 300 has a float16 spacing of 1/4 px and a bfloat16 spacing of 2 px) and the sum
of up to 25 weighted taps in the CARAFE/FADE reassembly (accumulated in the output's dtype it
carries several roundings of the result). Those steps run in float32 and their result is cast
back, so a float32 run is unchanged (every cast is the identity) and so is its traced graph.
tests/layers/test_half_precision.py measures the error with and without the islands.
"""

import contextlib

import torch

__all__ = ["float32_island", "is_half"]


def is_half(x: torch.Tensor) -> bool:
    """Whether ``x`` is float16 or bfloat16 (float32 and float64 need no island)."""
    return x.dtype in (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def float32_island(x: torch.Tensor):
    """Inside: autocast off on ``x``'s device (when it was on), so float32 operands stay float32."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            yield
    else:
        yield
