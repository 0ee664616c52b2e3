"""CUDA tier: the benchmarks' CUDA clock and memory gauge (afigan/benchmark/timing.py) and one
upsampler row on the GPU, with its memory column."""

import torch
from cuda_helpers import CUDA_TIER

from afigan.benchmark.timing import Stopwatch, median_seconds, peak_memory

pytestmark = CUDA_TIER


def test_cuda_events_time_the_kernels_and_memory_is_the_rows_own():
    a = torch.randn(2048, 2048, device="cuda")
    watch = Stopwatch("cuda")
    watch.start()
    for _ in range(10):
        a = a @ a / 2048
    seconds = watch.stop()
    assert 0 < seconds < 10
    assert median_seconds(lambda: a @ a, repeats=3, device="cuda") > 0
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB kept before the row
    row = {}
    with peak_memory("cuda", row, "peak"):
        tmp = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB inside it
        del tmp
    assert 256 + 64 <= row["peak"] < 256 + 64 + 64  # reset on entry: the earlier peak is gone
    del big


def test_upsampler_benchmark_row_on_the_gpu_has_its_memory_column():
    from afigan.benchmark.upsamplers import VARIANTS, benchmark, format_table

    rows = benchmark(VARIANTS, p2=(64, 96), device="cuda", repeats=2, neck=False, labels=["afi", "dysample lp"])
    assert [r["label"] for r in rows] == ["afi", "dysample lp"]
    assert all(r["call_peak_mib"] > 0 and r["call_ms"] > 0 for r in rows)
    assert "| x2 MiB |" in format_table(rows).splitlines()[0]
