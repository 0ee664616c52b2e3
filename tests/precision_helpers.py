"""Shared by the reduced-precision tests on a CPU (tests/layers/test_half_precision.py) and on CUDA
(tests/cuda/test_cuda_layers.py): inputs, one forward+backward step, errors, tolerances."""

import torch

from afigan.layers import is_guided

# dtype -> (output, input gradient, worst parameter gradient) tolerances
TOLERANCE = {torch.bfloat16: (8e-3, 1.5e-2, 2e-2), torch.float16: (1e-3, 4e-3, 3e-3)}
DEEP_PARAM_GRAD = {torch.bfloat16: 0.15, torch.float16: 0.06}  # the AF interpolator's parameters
# Small but not toy: 24 x 40 -> 48 x 80 (positions up to 80 px), 16 channels.
SHAPE = (2, 16, 24, 40)


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def trained_like(up):
    """Weights drawn at a trained network's scale: the learned kinds start near identity (zero
    offsets, uniform kernels), which would hide the error of their learned parts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in up.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return up


def inputs(kind, shape=SHAPE, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(*shape, generator=g)
    guide = torch.randn(n, c, 2 * h, 2 * w, generator=g) if is_guided(kind) else None
    weight = torch.randn(n, c, 2 * h, 2 * w, generator=g)  # a fixed upstream gradient
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(guide), to(weight)


def step(up, x, guide, weight, autocast_dtype=None):
    """Output, input gradient and parameter gradients of ``sum(weight * up(x))``."""
    up.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = up(x, guide=guide)
    (out.float() * weight).sum().backward()
    return out, x.grad, {n: p.grad.clone() for n, p in up.named_parameters()}
