"""CUDA tier: every upsampler kind under CUDA autocast (float16, bfloat16) vs float32, forward and
backward (the CPU suite's tolerances, tests/precision_helpers.py); MODEL.AFI.CHANNELS_LAST and
MODEL.AFI.COMPILE (inductor) on G and D equal to eager."""

import pytest
import torch
from cuda_helpers import CUDA_TIER, no_tf32, rel_error
from precision_helpers import DEEP_PARAM_GRAD, TOLERANCE, inputs, rel, step, trained_like

from afigan.layers import FeaturePatchDiscriminator, build_upsampler, upsampler_kinds

pytestmark = CUDA_TIER


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", upsampler_kinds())
def test_every_upsampler_under_cuda_autocast_matches_float32(kind, dtype):
    torch.manual_seed(0)
    up = trained_like(build_upsampler(kind, 16, **({"num_blocks": 1} if kind == "afi" else {}))).cuda()
    x, guide, weight = inputs(kind, device="cuda")
    x, guide = x.to(dtype), None if guide is None else guide.to(dtype)
    with no_tf32():
        ref_out, ref_dx, ref_dp = step(up, x.float(), None if guide is None else guide.float(), weight)
    out, dx, dp = step(up, x, guide, weight, autocast_dtype=dtype)
    tol_out, tol_dx, tol_dp = TOLERANCE[dtype]
    tol_dp = DEEP_PARAM_GRAD[dtype] if kind == "afi" else tol_dp
    assert out.dtype == dtype and out.device.type == "cuda"
    assert rel(out, ref_out) < tol_out and rel(dx, ref_dx) < tol_dx
    assert all(rel(dp[k], ref_dp[k]) < tol_dp for k in dp), {k: rel(dp[k], ref_dp[k]) for k in dp}


def _g_and_d():
    torch.manual_seed(0)
    g = build_upsampler("afi", 32, num_blocks=1, growth=16).cuda()
    d = FeaturePatchDiscriminator(32, base_width=16).cuda()
    return g, d


def _fwd_bwd(g, d, x):
    for m in (g, d):
        m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = d(g(x))
    out.square().mean().backward()
    return out, x.grad, [p.grad for m in (g, d) for p in m.parameters()]


@pytest.mark.parametrize("switch", ["channels_last", "compile"])
def test_channels_last_and_inductor_compile_equal_eager(switch):
    """Outputs and gradients within 1e-4 (relative L2; measured order 1e-6: another summation
    order of the same float32 arithmetic, TF32 off)."""
    x = torch.randn(2, 32, 20, 28, device="cuda")
    with no_tf32():
        eager = _fwd_bwd(*_g_and_d(), x)
        g, d = _g_and_d()
        if switch == "channels_last":
            g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
            fast = _fwd_bwd(g, d, x.contiguous(memory_format=torch.channels_last))
        else:
            g.compile(backend="inductor"), d.compile(backend="inductor")
            fast = _fwd_bwd(g, d, x)
            assert g._compiled_call_impl is not None and d._compiled_call_impl is not None
    assert rel_error(fast[0], eager[0]) < 1e-4 and rel_error(fast[1], eager[1]) < 1e-4
    assert len(fast[2]) == len(eager[2]) and all(rel_error(a, b) < 1e-4 for a, b in zip(fast[2], eager[2]))
