"""Shared by the CUDA tier (tests/cuda): its marks and the float32 comparison settings."""

import contextlib

import pytest
import torch

# Every module of the tier: `pytest -m cuda` selects it; without a GPU each test skips saying why.
CUDA_TIER = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PRECISIONS = ["float32", "float16", "bfloat16"]
# float32 on the GPU (TF32 off) vs the CPU: the same arithmetic up to summation order (cuDNN's
# algorithms): measured in the tier as relative L2 error, allowed 1e-4.
FIRST_FORWARD_RTOL = 1e-4


@contextlib.contextmanager
def no_tf32():
    """float32 matmuls and convolutions in full float32 while inside (TF32 would round to 10 bits)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def amp_opts(precision: str):
    """Config options of a precision: float32, or autocast in float16 (GradScaler) / bfloat16."""
    if precision == "float32":
        return ["SOLVER.AMP.ENABLED", False]
    return ["SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision]
