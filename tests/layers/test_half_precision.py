"""Reduced precision on a CPU: every upsampler kind under CPU autocast (bfloat16 and float16),
forward and backward, against float32; and the float32 islands (afigan/layers/precision.py) that
keep DySample's sampling positions and the CARAFE/FADE reassembly accurate in half precision.

Errors are relative L2 errors ``|a - b| / |b|``. The float32 reference runs on the input already
rounded to the half dtype (as a previous layer under autocast would hand it over), so the error
measured is the layer's own. One rounding of the result is 2^-9 = 2.0e-3 in bfloat16 and
2^-12 = 2.4e-4 in float16; the tolerances are a few of those. Measured (bfloat16 / float16): at
most 3.1e-3 / 4.4e-4 on the output, 6.0e-3 / 1.8e-3 on the input gradient, 7.3e-3 / 1.0e-3 on a
parameter gradient; the AF interpolator's parameter gradients, through its 9 convolutions (one
dense block here), 7.0e-2 / 2.8e-2: autocast's error builds up with depth, in any network."""

import pytest
import torch
from precision_helpers import DEEP_PARAM_GRAD, TOLERANCE, inputs, rel, step, trained_like

from afigan.layers import CARAFE, FADE, DySample, build_upsampler, upsampler_kinds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", upsampler_kinds())
def test_every_upsampler_under_cpu_autocast_matches_float32(kind, dtype):
    torch.manual_seed(0)
    up = build_upsampler(kind, 16, **({"num_blocks": 1} if kind == "afi" else {}))
    trained_like(up)
    x, guide, weight = inputs(kind)
    x, guide = x.to(dtype), None if guide is None else guide.to(dtype)  # what a previous layer hands over
    ref_out, ref_dx, ref_dp = step(up, x.float(), None if guide is None else guide.float(), weight)
    out, dx, dp = step(up, x, guide, weight, autocast_dtype=dtype)
    tol_out, tol_dx, tol_dp = TOLERANCE[dtype]
    tol_dp = DEEP_PARAM_GRAD[dtype] if kind == "afi" else tol_dp
    assert out.dtype == dtype and dx.dtype == dtype  # it really ran in half precision
    assert rel(out, ref_out) < tol_out
    assert rel(dx, ref_dx) < tol_dx
    assert sorted(dp) == sorted(ref_dp) and all(rel(dp[k], ref_dp[k]) < tol_dp for k in dp)
    assert all(dp[k].dtype == torch.float32 for k in dp)  # float32 master weights get float32 gradients


def _island_errors(up, x, guide, run):
    """(error with the island, error without) of ``run(up, x, guide)`` against float32."""
    ref = run(up, x.float(), None if guide is None else guide.float())
    errors = []
    for island in (True, False):
        up.float32_island = island
        errors.append(rel(run(up, x, guide), ref))
    del up.float32_island  # back to the class default
    return errors


def test_dysample_positions_in_float32_keep_a_half_precision_module_accurate():
    """A whole-half DySample (module and input in bfloat16 / float16, no autocast, as in a
    ``model.half()`` deployment): without the island the sampling positions of a 160-px-wide map
    are rounded to 1 px (bfloat16) / 1/16 px (float16)."""
    x, _, _ = inputs("dysample", shape=(1, 16, 20, 160))
    up = trained_like(DySample(16, groups=4))

    def run(module, inp, guide):
        with torch.no_grad():
            return module.to(inp.dtype)(inp)

    for dtype, (with_island, without) in {
        torch.bfloat16: _island_errors(up, x.to(torch.bfloat16), None, run),
        torch.float16: _island_errors(up, x.to(torch.float16), None, run),
    }.items():
        tol_out = TOLERANCE[dtype][0]
        assert with_island < tol_out < without, (dtype, with_island, without)
        assert without > 5 * with_island, (dtype, with_island, without)


@pytest.mark.parametrize("cls", [CARAFE, FADE], ids=["carafe", "fade"])
def test_reassembly_in_float32_under_autocast_is_more_accurate(cls):
    kind = cls.__name__.lower()
    x, guide, weight = inputs(kind, shape=(2, 16, 24, 100))
    up = trained_like(cls(16))

    def run(module, inp, g):
        return step(module, inp, g, weight, autocast_dtype=None if inp.dtype == torch.float32 else inp.dtype)[0]

    xq = x.to(torch.bfloat16)
    gq = None if guide is None else guide.to(torch.bfloat16)
    with_island, without = _island_errors(up, xq, gq, run)
    # measured: CARAFE 2.6e-3 with, 6.2e-3 without; FADE (whose gated guide term stays in
    # bfloat16 either way) 3.5e-3 with, 3.7e-3 without
    assert with_island < without, (with_island, without)
    if cls is CARAFE:
        assert with_island < 3e-3 < 5e-3 < without, (with_island, without)


@pytest.mark.parametrize("cls", [DySample, CARAFE, FADE], ids=["dysample", "carafe", "fade"])
def test_islands_change_nothing_in_float32(cls):
    kind = cls.__name__.lower()
    x, guide, weight = inputs(kind)
    up = trained_like(cls(16))
    results = []
    for island in (True, False):
        up.float32_island = island
        results.append(step(up, x, guide, weight))
    (out_a, dx_a, dp_a), (out_b, dx_b, dp_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(dp_a[k], dp_b[k]) for k in dp_a)
