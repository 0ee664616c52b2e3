"""Roofline of AFI-GAN's hot paths: for the AF interpolator, the feature patch discriminator and one
step of each stage, the measured time, the FLOPs, the achieved GFLOP/s and the ratio to this
machine's dense-convolution throughput (a plain 3x3 convolution of the same channels, map size,
dtype and memory format, measured in the same run). Used by tools/benchmark_roofline.py.

FLOPs: one multiply-add is 2 FLOPs. Every row's FLOPs, and so its GFLOP/s, are counted by
``torch.utils.flop_counter``, which sees convolutions and matrix products, backward kernels
included (a whole training step); forward rows also give fvcore's ``FlopCountAnalysis`` count
(x 2), which agrees on convolutions and adds norms and interpolation (tests/benchmark/test_roofline.py).

This module: the variants, FLOP counting, timing and the module rows; one step of each stage is
measured in :mod:`.roofline_steps`, the tables and the chart are :mod:`.roofline_report`.
"""

import contextlib
from typing import Callable, Dict, List

import torch
from detectron2.utils.analysis import FlopCountAnalysis
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from afigan.layers import AFInterpolator, FeaturePatchDiscriminator

from .timing import median_seconds, peak_memory

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANTS",
    "STEP_CONFIGS",
    "fvcore_flops",
    "counted_flops",
    "timed",
    "plain_conv",
    "conv_layers_alone",
    "module_rows",
]

# name -> (dtype, channels_last, D patch size); the switches a user can turn on (README "Performance").
VARIANTS: Dict[str, Dict] = {
    "fp32": dict(dtype=torch.float32, channels_last=False, patch=0),
    "fp32 channels_last": dict(dtype=torch.float32, channels_last=True, patch=0),
    "bf16": dict(dtype=torch.bfloat16, channels_last=False, patch=0),
    "bf16 channels_last": dict(dtype=torch.bfloat16, channels_last=True, patch=0),
    "fp32 D patch 64": dict(dtype=torch.float32, channels_last=False, patch=64),
    "bf16 channels_last D patch 64": dict(dtype=torch.bfloat16, channels_last=True, patch=64),
    # MODEL.AFI.COMPILE (inductor); not in the default list: compiling costs minutes per stage
    "fp32 compiled": dict(dtype=torch.float32, channels_last=False, patch=0, compile=True),
    "bf16 channels_last compiled": dict(dtype=torch.bfloat16, channels_last=True, patch=0, compile=True),
}
DEFAULT_VARIANTS = [k for k, v in VARIANTS.items() if not v.get("compile")]

# measured step -> its toy config ("plain" is Detectron2's own DefaultTrainer on the stage-3
# detector with a nearest-neighbour FPN: the stage-0 teacher config).
STEP_CONFIGS = {
    "stage1": "toy/pipeline/stage1.yaml",
    "stage2": "toy/pipeline/stage2.yaml",
    "stage3": "toy/pipeline/stage3.yaml",
    "plain": "toy/pipeline/stage0.yaml",
}


def fvcore_flops(module: nn.Module, inputs) -> float:
    """Forward FLOPs of ``module(*inputs)`` by fvcore (its multiply-adds x 2)."""
    return (
        2.0 * FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
    )


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of everything ``fn`` runs, backward included (``torch.utils.flop_counter``)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a
    GPU: afigan/benchmark/timing.py)."""
    return median_seconds(fn, repeats, device, warmup=warmup)


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _format(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _run(module: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], object]:
    def call():
        if backward:
            module.zero_grad(set_to_none=True)
            module(x).float().sum().backward()
        else:
            with torch.no_grad():
                module(x)

    return call


def plain_conv(
    channels: int, hw, device: str, dtype: torch.dtype, channels_last: bool, backward: bool, repeats: int
) -> Dict:
    """GFLOP/s of one 3x3 ``channels -> channels`` convolution on a (1, channels, h, w) map: the
    machine's dense-convolution throughput the other rows are compared with."""
    conv = nn.Conv2d(channels, channels, 3, 1, 1).to(device)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    x = _format(torch.randn(1, channels, *hw, device=device), channels_last).requires_grad_(backward)
    with _autocast(device, dtype):
        run = _run(conv, x, backward)
        flops = counted_flops(run)
        seconds = timed(run, repeats, device)
    return dict(flops=flops, seconds=seconds, gflops_per_s=flops / seconds / 1e9)


def conv_layers_alone(module: nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype, repeats: int) -> Dict:
    """Forward time and FLOPs of each convolution of ``module`` run alone on the input it gets inside
    ``module(x)``: the throughput of the module's own layers, against which its overheads show."""
    inputs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0].detach().clone())))
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    try:
        with torch.no_grad(), _autocast(device, dtype):
            module(x)
    finally:
        for h in hooks:
            h.remove()
    flops = seconds = 0.0
    for m, inp in inputs:
        with torch.no_grad(), _autocast(device, dtype):
            run = lambda m=m, inp=inp: m(inp)  # noqa: E731
            flops += counted_flops(run)
            seconds += timed(run, repeats, device)
    return dict(flops=flops, seconds=seconds, gflops_per_s=flops / seconds / 1e9, layers=len(inputs))


@contextlib.contextmanager
def _eager(module: nn.Module):
    """``module`` without its ``module.compile()`` for the duration."""
    compiled = module._compiled_call_impl
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def _module_row(
    name: str,
    module: nn.Module,
    x: torch.Tensor,
    backward: bool,
    variant: str,
    device: str,
    repeats: int,
    conv_hw,
    with_layers: bool,
) -> Dict:
    v = VARIANTS[variant]
    x = _format(x, v["channels_last"]).requires_grad_(backward)
    memory = {}  # peak MiB of the timed calls, on CUDA only
    with _autocast(device, v["dtype"]), peak_memory(device, memory, "peak_mem_mib"):
        run = _run(module, x, backward)
        seconds = timed(run, repeats, device)
    with _eager(module):  # the counters see a compiled graph's kernels only in eager mode
        with _autocast(device, v["dtype"]):
            flops = counted_flops(run)
        # fvcore's tracer cannot run under autocast (its cached weight casts need grad); the count is the same.
        fv = None if backward else fvcore_flops(module, (x,))
    ref = plain_conv(module.channels, conv_hw, device, v["dtype"], v["channels_last"], backward, repeats)
    row = dict(
        component=name,
        variant=variant,
        seconds=seconds,
        gflops=flops / 1e9,
        fvcore_gflops=None if fv is None else fv / 1e9,
        gflops_per_s=flops / seconds / 1e9,
        plain_conv_gflops_per_s=ref["gflops_per_s"],
        input=list(x.shape),
        **memory,
    )
    row["ratio_to_plain_conv"] = row["gflops_per_s"] / ref["gflops_per_s"]
    if with_layers:
        with _eager(module):
            own = conv_layers_alone(module, x, device, v["dtype"], repeats)
        row["own_layers_gflops_per_s"] = own["gflops_per_s"]
        row["ratio_to_own_layers"] = row["gflops_per_s"] / own["gflops_per_s"]
    return row


def module_rows(short_side: int, variants: List[str], device: str, repeats: int, channels: int = 256) -> List[Dict]:
    """The AF interpolator's x2 call onto P2 (input P3 of a short_side x 1.5 short_side image) and D
    on P2, forward and forward+backward, for each variant."""
    h3, w3 = short_side // 8, (3 * short_side // 2) // 8
    rows = []
    for variant in variants:
        v = VARIANTS[variant]
        if v["patch"]:
            continue  # D patches change steps, not a single call
        torch.manual_seed(0)
        g = AFInterpolator(channels).to(device)
        d = FeaturePatchDiscriminator(channels).to(device)
        if v["channels_last"]:
            g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
        if v.get("compile"):
            g.compile(), d.compile()  # the first (untimed) call of each row compiles
        x3 = torch.randn(1, channels, h3, w3, device=device)
        x2 = torch.randn(1, channels, 2 * h3, 2 * w3, device=device)
        for backward in (False, True):
            suffix = " fwd+bwd" if backward else " fwd"
            g.train(backward), d.train(backward)
            rows.append(
                _module_row(
                    "AF interpolator" + suffix,
                    g,
                    x3,
                    backward,
                    variant,
                    device,
                    repeats,
                    (h3, w3),
                    with_layers=not backward,
                )
            )
            rows.append(
                _module_row(
                    "discriminator" + suffix,
                    d,
                    x2,
                    backward,
                    variant,
                    device,
                    repeats,
                    (2 * h3, 2 * w3),
                    with_layers=False,
                )
            )
    for r in rows:
        r["short_side"] = short_side
    return rows
