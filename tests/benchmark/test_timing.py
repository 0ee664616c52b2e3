"""The benchmarks' shared clock (afigan/benchmark/timing.py): which clock each device gets, the
warm-up and repeat counts, and that memory is reported (and tabled) on CUDA only. The CUDA branch
itself runs in tests/cuda/test_cuda_benchmarks.py."""

import time

import pytest
import torch

from afigan.benchmark.timing import Stopwatch, clock_name, median_seconds, on_cuda, peak_memory


def test_each_device_gets_its_clock():
    assert [clock_name(d) for d in ("cpu", "cuda", "cuda:1", torch.device("cuda", 0))] == [
        "perf_counter",
        "cuda events",
        "cuda events",
        "cuda events",
    ]
    assert not on_cuda("cpu") and on_cuda("cuda:3") and not Stopwatch("cpu").cuda and Stopwatch("cuda").cuda


def test_median_of_the_timed_calls_after_the_warm_up():
    calls, sleeps = [], [0.0, 0.0, 0.03, 0.001, 0.03]  # warm-up, then 4 timed calls

    def fn():
        time.sleep(sleeps[len(calls)])
        calls.append(1)

    seconds = median_seconds(fn, repeats=4, device="cpu", warmup=1)
    assert len(calls) == 5
    assert 0.015 <= seconds  # median of (0, 0.03, 0.001, 0.03): between the two middle ones
    watch = Stopwatch("cpu")
    watch.start()
    time.sleep(0.01)
    assert watch.stop() >= 0.01


def test_no_memory_figure_on_a_cpu_and_the_tables_keep_their_columns():
    from afigan.benchmark import necks, roofline_report, upsamplers

    row = {}
    with peak_memory("cpu", row, "peak_mem_mib"):
        torch.zeros(1000)
    assert row == {}
    base = dict(component="discriminator fwd", variant="fp32", short_side=64, seconds=0.5, gflops=1.0)
    base.update(gflops_per_s=2.0, plain_conv_gflops_per_s=4.0, ratio_to_plain_conv=0.5)
    cpu = roofline_report.format_table([base]).splitlines()
    gpu = roofline_report.format_table([dict(base, peak_mem_mib=123.4)]).splitlines()
    assert cpu[0].endswith("own layers ratio |") and gpu[0] == cpu[0] + " peak MiB |"
    assert gpu[2] == cpu[2] + " 123 |"
    up = dict(label="afi", params=1, call_gflops=1.0, call_ms=2.0)
    assert "MiB" not in upsamplers.format_table([up]) and "| x2 MiB |" in upsamplers.format_table(
        [dict(up, call_peak_mib=5.0)]
    )
    neck = dict(neck="FPN", kind="afi", neck_params=1e6, neck_gflops=1.0, neck_ms=2.0)
    assert "MiB" not in necks.format_table([neck])
    assert necks.format_table([dict(neck, neck_peak_mib=7.0)]).splitlines()[2].endswith("| 2.0 | 7 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU (the tier checks that branch)")
def test_a_cuda_clock_without_a_gpu_fails_loudly_instead_of_timing_the_host():
    watch = Stopwatch("cuda")
    with pytest.raises((RuntimeError, AssertionError)):
        watch.start()
