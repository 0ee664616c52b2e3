"""Roofline of AFI-GAN's hot paths: for the AF interpolator, the feature patch discriminator and one
step of each stage, the measured time, the FLOPs, the achieved GFLOP/s and the ratio to this
machine's dense-convolution throughput (a plain 3x3 convolution of the same channels, map size,
dtype and memory format, measured in the same run). Used by tools/benchmark_roofline.py.

FLOPs: one multiply-add is 2 FLOPs. Every row's FLOPs, and so its GFLOP/s, are counted by
``torch.utils.flop_counter``, which sees convolutions and matrix products, backward kernels
included (a whole training step); forward rows also give fvcore's ``FlopCountAnalysis`` count
(x 2), which agrees on convolutions and adds norms and interpolation (tests/test_roofline.py).
"""

import contextlib
import itertools
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch
from detectron2.engine import DefaultTrainer
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from afigan.config import fallback_syncbn, load_config
from afigan.engine import DetectorTrainer, Stage1Trainer, Stage2Trainer
from afigan.layers import AFInterpolator, FeaturePatchDiscriminator
from afigan.modeling.meta_arch import build_guide_model

from .training import random_stage_inputs

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
    "step_rows",
    "top_ops",
    "format_table",
    "targets",
    "plot",
    "patch_ablation",
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    with _autocast(device, v["dtype"]):
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


def _cfg(config: str, opts: List[str], stage: str):
    """The stage's config with ``opts``, without Detectron2's default_setup (whose logging would bury
    the table; nothing is written but the random weights)."""
    cfg = load_config(config, opts)
    cfg.MODEL.AFI.STAGE = "" if stage == "plain" else stage
    fallback_syncbn(cfg)
    cfg.freeze()
    return cfg


def _trainer(stage: str, configs_dir: str, short_side: int, batch: int, variant: str, device: str):
    """A trainer of ``stage`` at reference sizes (R-50, 256-channel FPN, full G and D, Detectron2's
    Mask R-CNN heads) on the toy set resized to ``short_side``, with random weights for the
    teacher, G and D."""
    v = VARIANTS[variant]
    out = tempfile.mkdtemp(prefix=f"roofline_{stage}_")
    opts = [
        "OUTPUT_DIR",
        out,
        "MODEL.DEVICE",
        device,
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.MAX_ITER",
        "1000",
        "INPUT.MIN_SIZE_TRAIN",
        f"({short_side},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(2 * short_side),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "DATASETS.TEST",
        "()",
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.FPN.OUT_CHANNELS",
        "256",
        "MODEL.AFI.NUM_BLOCKS",
        "3",
        "MODEL.AFI.GROWTH",
        "32",
        "MODEL.AFI.DIS.BASE_WIDTH",
        "0",
        "MODEL.RESNETS.DEPTH",
        "50",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "256",
        # Detectron2's Mask R-CNN heads and sampling (the toy configs shrink them)
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "1024",
        "MODEL.ROI_MASK_HEAD.NUM_CONV",
        "4",
        "MODEL.ROI_MASK_HEAD.CONV_DIM",
        "256",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "512",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
        "256",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
        "2000",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "1000",
        "SOLVER.AMP.ENABLED",
        str(v["dtype"] != torch.float32),
        "SOLVER.AMP.PRECISION",
        "bfloat16" if v["dtype"] == torch.bfloat16 else "float16",
        "MODEL.AFI.CHANNELS_LAST",
        str(v["channels_last"]),
        "MODEL.AFI.DIS.PATCH_SIZE",
        str(v["patch"]),
        "MODEL.AFI.COMPILE",
        str(bool(v.get("compile"))),
    ]
    config = os.path.join(configs_dir, STEP_CONFIGS[stage])
    if stage in ("stage1", "stage2"):
        opts += random_stage_inputs(_cfg(config, opts, stage), stage, out)
    cfg = _cfg(config, opts, stage)
    trainer = {"stage1": Stage1Trainer, "stage2": Stage2Trainer, "stage3": DetectorTrainer, "plain": DefaultTrainer}[
        stage
    ](cfg)
    if stage != "plain":
        trainer.resume_or_load(resume=False)
    # Every timed step sees the same batch, the one whose FLOPs are counted (the toy images'
    # aspect ratios differ, so successive batches differ in size).
    loader = (
        trainer._trainer.data_loader
        if stage == "plain"
        else (trainer.build_train_loader(cfg) if stage == "stage3" else trainer.data_loader)
    )
    batch = next(iter(loader))
    same = itertools.repeat(batch)
    if stage in ("stage3", "plain"):
        trainer._trainer.data_loader = same
        trainer._trainer._data_loader_iter_obj = None
    else:
        trainer.data_loader = same
    trainer.iter = trainer.start_iter
    trainer.image_size = list(batch[0]["image"].shape[-2:])
    return trainer


def step_rows(
    stages: List[str],
    short_side: int,
    batch: int,
    variants: List[str],
    configs_dir: str,
    device: str,
    repeats: int,
    profile=(),
) -> List[Dict]:
    """One training step of each stage (and of plain Detectron2) per variant: seconds, FLOPs (forward
    and backward) and the ratio to the plain 3x3 conv fwd+bwd at P2 of the image; for the variants
    in ``profile`` also the step's top-10 operators."""
    rows = []
    p2 = (short_side // 4, (3 * short_side // 2) // 4)
    for variant in variants:
        v = VARIANTS[variant]
        ref = plain_conv(256, p2, device, v["dtype"], v["channels_last"], True, repeats)
        for stage in stages:
            if v["patch"] and stage not in ("stage1", "stage2"):
                continue  # D runs only in stages 1 and 2
            if stage == "plain" and variant != "fp32":
                continue  # Detectron2's own trainer knows none of the switches (and its AMP needs CUDA)
            torch.manual_seed(0)
            trainer = _trainer(stage, configs_dir, short_side, batch, variant, device)
            with EventStorage(0) as trainer.storage:
                flops = counted_flops(trainer.run_step)  # also the warm-up call
                seconds = timed(trainer.run_step, repeats, device, warmup=0)
                ops = top_ops(trainer.run_step, device=device) if variant in profile else None
            row = dict(
                component=f"{stage} step",
                variant=variant,
                seconds=seconds,
                gflops=flops / 1e9,
                fvcore_gflops=None,
                gflops_per_s=flops / seconds / 1e9,
                plain_conv_gflops_per_s=ref["gflops_per_s"],
                short_side=short_side,
                batch=batch,
                image=trainer.image_size,
            )
            row["ratio_to_plain_conv"] = row["gflops_per_s"] / ref["gflops_per_s"]
            if ops is not None:
                row["top_ops"] = ops
            rows.append(row)
            del trainer
    return rows


def top_ops(fn: Callable[[], object], n: int = 10, device: str = "cpu") -> List[Dict]:
    """The ``n`` operators of ``fn`` with the most self time (``torch.profiler``; on CUDA, device time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    averages = prof.key_averages()
    total = sum(self_time(e) for e in averages) or 1.0
    return [
        dict(op=e.key, calls=e.count, self_ms=self_time(e) / 1e3, share=self_time(e) / total)
        for e in sorted(averages, key=self_time, reverse=True)[:n]
    ]


def format_table(rows: List[Dict]) -> str:
    lines = [
        "| component | variant | short side | ms | GFLOPs | GFLOP/s | plain 3x3 conv GFLOP/s | ratio | own "
        "layers ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        own = f"{r['ratio_to_own_layers']:.2f}" if "ratio_to_own_layers" in r else ""
        name = f"{r['component']} ({r['image'][0]}x{r['image'][1]})" if "image" in r else r["component"]
        lines.append(
            f"| {name} | {r['variant']} | {r['short_side']} | {r['seconds'] * 1e3:.0f} | {r['gflops']:.1f} | "
            f"{r['gflops_per_s']:.0f} | {r['plain_conv_gflops_per_s']:.0f} | {r['ratio_to_plain_conv']:.2f} | {own} |"
        )
    return "\n".join(lines)


def targets(rows: List[Dict]) -> List[Dict]:
    """The issue's three targets, checked on ``rows`` of one run (per short side): the AF
    interpolator forward at >= 70 % of its own layers' throughput; a stage-3 step at most 1.1 x
    (its FLOP ratio to the plain Detectron2 step) x that step's time; the fastest stage-1 variant
    at least 30 % below the float32 default."""
    out = []
    for side in sorted({r["short_side"] for r in rows}):
        at = {(r["component"], r["variant"]): r for r in rows if r["short_side"] == side}
        afi = at.get(("AF interpolator fwd", "fp32"))
        if afi and "ratio_to_own_layers" in afi:
            out.append(
                dict(
                    short_side=side,
                    target="AF interpolator fwd >= 0.70 x own layers' GFLOP/s (fp32)",
                    value=afi["ratio_to_own_layers"],
                    met=afi["ratio_to_own_layers"] >= 0.70,
                )
            )
        s3, plain = at.get(("stage3 step", "fp32")), at.get(("plain step", "fp32"))
        if s3 and plain:
            allowed = 1.1 * s3["gflops"] / plain["gflops"]
            value = s3["seconds"] / plain["seconds"]
            out.append(
                dict(
                    short_side=side,
                    target=f"stage-3 step time / plain step <= 1.1 x FLOP ratio = {allowed:.2f}",
                    value=value,
                    met=value <= allowed,
                )
            )
        s1 = [r for (c, v), r in at.items() if c == "stage1 step"]
        base = at.get(("stage1 step", "fp32"))
        if base and len(s1) > 1:
            best = min(s1, key=lambda r: r["seconds"])
            value = best["seconds"] / base["seconds"]
            out.append(
                dict(
                    short_side=side,
                    target=f"stage-1 step ({best['variant']}) / fp32 default <= 0.70",
                    value=value,
                    met=value <= 0.70,
                )
            )
    return out


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Bar chart of each component's ratio to the plain 3x3 conv, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['component']} @{r['short_side']}" for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4.5))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, label in enumerate(labels):
            r = next((r for r in rows if r["variant"] == v and f"{r['component']} @{r['short_side']}" == label), None)
            if r is not None:
                xs.append(j + i * width)
                ys.append(r["ratio_to_plain_conv"])
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GFLOP/s / plain 3x3 conv GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def patch_ablation(
    configs_dir: str, patch_sizes: List[int], iters: int, teacher: str, device: str, tail: int = 20
) -> List[Dict]:
    """``MODEL.AFI.DIS.PATCH_SIZE``'s effect: the toy stage 1 (configs/toy/pipeline/stage1.yaml)
    trained ``iters`` iterations from the same seed with each patch size; median seconds per
    iteration and the stage-1 content loss (sum over levels, mean of the last ``tail``
    iterations). ``teacher``: a teacher checkpoint; "" draws a random one (its FPN outputs scaled
    to O(1), as a trained teacher's are)."""
    rows = []
    out = tempfile.mkdtemp(prefix="roofline_patches_")
    config = os.path.join(configs_dir, STEP_CONFIGS["stage1"])
    if not teacher:
        cfg = _cfg(config, ["MODEL.DEVICE", device], "stage1")
        torch.manual_seed(0)
        state = build_guide_model(cfg, load_weights=False).state_dict()
        teacher = os.path.join(out, "teacher.pth")
        torch.save({"model": {k: v * 0.05 if "fpn_output" in k else v for k, v in state.items()}}, teacher)
    for size in patch_sizes:
        cfg = _cfg(
            config,
            [
                "OUTPUT_DIR",
                os.path.join(out, f"patch{size}"),
                "MODEL.DEVICE",
                device,
                "SOLVER.MAX_ITER",
                str(iters),
                "SOLVER.CHECKPOINT_PERIOD",
                "1000000",
                "MODEL.GUIDE_WEIGHTS",
                teacher,
                "SEED",
                "0",
                "MODEL.AFI.DIS.PATCH_SIZE",
                str(size),
            ],
            "stage1",
        )
        torch.manual_seed(0)
        trainer = Stage1Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        hist = trainer.storage.histories()
        content = [
            sum(v) for v in zip(*[[x for x, _ in hist[k].values()] for k in hist if k.startswith("loss_content_")])
        ]
        times = [x for x, _ in hist["time"].values()]
        rows.append(
            dict(
                patch_size=size,
                iters=iters,
                s_per_iter=statistics.median(times[2:] or times),
                content_loss=statistics.mean(content[-tail:]),
                content_loss_first=content[0],
                teacher=teacher,
            )
        )
    return rows
