"""The roofline benchmark's arithmetic (afigan/benchmark/roofline.py): FLOP counts against fvcore and
against the formula, the rows it builds, and the targets it checks. Timing itself is never tested."""

import pytest
import torch

pytest.importorskip("detectron2")

from afigan.benchmark.roofline import counted_flops, fvcore_flops, module_rows, plain_conv  # noqa: E402
from afigan.benchmark.roofline_report import targets  # noqa: E402
from afigan.layers import AFInterpolator, FeaturePatchDiscriminator  # noqa: E402


def test_torch_flop_counter_agrees_with_fvcore_on_convolutions():
    d = FeaturePatchDiscriminator(channels=16, base_width=8, norm="").eval()
    g = AFInterpolator(channels=16, num_blocks=2, growth=8).eval()
    x = torch.randn(1, 16, 6, 9)
    with torch.no_grad():
        assert counted_flops(lambda: d(x)) == fvcore_flops(d, (x,))
        # fvcore also counts the bilinear skip (4 multiply-adds per output value) and norms; torch's
        # counter counts only convolutions and matrix products
        assert fvcore_flops(g, (x,)) - counted_flops(lambda: g(x)) == 2 * 4 * (16 * 12 * 18)
        d_bn = FeaturePatchDiscriminator(channels=16, base_width=8).eval()
        # an affine BatchNorm in eval mode: 2 "flops" (scale, shift) per value, x 2 here
        assert fvcore_flops(d_bn, (x,)) - counted_flops(lambda: d_bn(x)) == 2 * 2 * (16 + 32 + 32) * 6 * 9


def test_interpolator_flops_equal_the_formula():
    c, g, h, w = 16, 8, 6, 9
    module = AFInterpolator(channels=c, num_blocks=1, growth=g)
    x = torch.randn(1, c, h, w)
    macs_per_pixel = 9 * c * c * 2  # Conv_A and Conv_B at the input size
    macs_per_pixel += 9 * sum((c + i * g) * g for i in range(4)) + 9 * (c + 4 * g) * c  # one dense block
    macs_per_pixel += 36 * c * c  # the k6 s2 deconvolution: 6 x 6 taps per input pixel
    macs = macs_per_pixel * h * w + 9 * c * c * (2 * h) * (2 * w)  # Conv_C at the output size
    with torch.no_grad():
        assert counted_flops(lambda: module(x)) == 2 * macs


def test_plain_conv_row_counts_forward_and_backward():
    fwd = plain_conv(8, (5, 7), "cpu", torch.float32, False, backward=False, repeats=1)
    both = plain_conv(8, (5, 7), "cpu", torch.float32, False, backward=True, repeats=1)
    assert fwd["flops"] == 2 * 8 * 8 * 9 * 5 * 7
    assert both["flops"] == 3 * fwd["flops"]  # input and weight gradients: two more convolutions
    assert fwd["gflops_per_s"] == pytest.approx(fwd["flops"] / fwd["seconds"] / 1e9)


def test_module_rows_of_one_variant():
    rows = module_rows(64, ["fp32", "fp32 D patch 64"], "cpu", repeats=1, channels=16)
    assert [r["component"] for r in rows] == [
        "AF interpolator fwd",
        "discriminator fwd",
        "AF interpolator fwd+bwd",
        "discriminator fwd+bwd",
    ]  # D patches change steps only
    fwd = rows[0]
    assert fwd["input"] == [1, 16, 8, 12]
    assert round(fwd["fvcore_gflops"] * 1e9 - fwd["gflops"] * 1e9) == 2 * 4 * 16 * 16 * 24  # + fvcore's bilinear skip
    assert "ratio_to_own_layers" in fwd and "ratio_to_own_layers" not in rows[2]
    for r in rows:
        assert r["ratio_to_plain_conv"] == pytest.approx(r["gflops_per_s"] / r["plain_conv_gflops_per_s"])
    assert rows[2]["gflops"] > 2.5 * rows[0]["gflops"]  # a backward costs about two forwards


def _row(component, variant, seconds, gflops=1.0, **extra):
    return dict(component=component, variant=variant, seconds=seconds, gflops=gflops, short_side=320, **extra)


def test_targets_are_checked_against_the_issue_thresholds():
    rows = [
        _row("AF interpolator fwd", "fp32", 1.0, ratio_to_own_layers=0.69),
        _row("stage3 step", "fp32", 2.1, gflops=2.0),
        _row("plain step", "fp32", 1.0, gflops=1.0),
        _row("stage1 step", "fp32", 10.0),
        _row("stage1 step", "bf16", 7.0),
        _row("stage1 step", "fp32 channels_last", 9.0),
    ]
    got = {t["target"].split(" ")[0]: t for t in targets(rows)}
    assert not got["AF"]["met"] and got["AF"]["value"] == 0.69
    assert got["stage-3"]["met"] and got["stage-3"]["value"] == pytest.approx(2.1)  # <= 1.1 x 2.0
    assert (
        got["stage-1"]["met"] and got["stage-1"]["value"] == pytest.approx(0.7) and "(bf16)" in got["stage-1"]["target"]
    )
    rows[1]["seconds"] = 2.25  # above 1.1 x 2
    rows[4]["seconds"] = 7.01
    got = {t["target"].split(" ")[0]: t for t in targets(rows)}
    assert not got["stage-3"]["met"] and not got["stage-1"]["met"]
