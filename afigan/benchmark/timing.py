"""The benchmarks' one clock and memory gauge: CUDA events and ``torch.cuda.max_memory_allocated``
on a GPU, ``time.perf_counter`` (and no memory figure) on a CPU.

On a GPU a host clock around a call measures the launch, not the kernels, unless it synchronises
every time; CUDA events are recorded on the stream and read after one synchronisation, so the
figure is the device time of the call. Peak memory is reset before each measured row, so it is
that row's own (the benchmarks' tables print it as a "MiB" column on CUDA only)."""

import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator, List

import torch

__all__ = ["on_cuda", "clock_name", "Stopwatch", "seconds_of", "median_seconds", "peak_memory"]


def on_cuda(device) -> bool:
    """Whether ``device`` ("cuda", "cuda:1", a torch.device, "cpu") is a CUDA device."""
    return torch.device(device).type == "cuda"


def clock_name(device) -> str:
    """The clock the benchmarks use on ``device``: "cuda events" or "perf_counter"."""
    return "cuda events" if on_cuda(device) else "perf_counter"


class Stopwatch:
    """``start()`` ... ``stop()`` -> seconds, on ``device``'s clock (:func:`clock_name`)."""

    def __init__(self, device):
        self.cuda = on_cuda(device)
        self.device = torch.device(device)

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1e3  # elapsed_time is in ms
        return time.perf_counter() - self._t0


def seconds_of(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn`` on ``device``'s clock."""
    watch = Stopwatch(device)
    watch.start()
    fn()
    return watch.stop()


def median_seconds(fn: Callable[[], object], repeats: int, device, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (caches, kernels,
    the allocator); on CUDA the device is synchronised before each timed call."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        if on_cuda(device):
            torch.cuda.synchronize(device)
        times.append(seconds_of(fn, device))
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device, row: Dict, key: str) -> Iterator[None]:
    """On CUDA: the peak of ``torch.cuda.max_memory_allocated`` while inside (reset on entry), in MiB,
    written to ``row[key]``; on a CPU nothing is written (the tables then have no memory column)."""
    if not on_cuda(device):
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    row[key] = torch.cuda.max_memory_allocated(device) / 2**20
