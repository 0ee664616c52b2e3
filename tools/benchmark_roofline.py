#!/usr/bin/env python
"""Roofline of AFI-GAN's hot paths: measured time, FLOPs, achieved GFLOP/s and the ratio to this
machine's plain 3x3 convolution (same channels, map size, dtype and memory format, measured in the
same run) for the AF interpolator and the discriminator (forward, forward+backward) and one step of
stages 1, 2, 3 and of plain Detectron2, at reference sizes (R-50, 256 channels, full G and D), for
each speed switch (float32 / bfloat16 autocast, channels_last, D patches). Prints a table and the
issue's targets, writes JSON and a PNG.

    python tools/benchmark_roofline.py --sizes 320 --out output/benchmark_roofline.json
    python tools/benchmark_roofline.py --device cuda --sizes 800 --variants fp32 "bf16 channels_last"
    python tools/benchmark_roofline.py --patch-ablation 0 16 --iters 200 --out output/benchmark_d_patches.json
"""

import argparse
import json
import logging
import os
import platform

import torch

import afigan  # noqa: F401  (registers the necks and data sets)
from afigan.benchmark.roofline import DEFAULT_VARIANTS, STEP_CONFIGS, VARIANTS, module_rows
from afigan.benchmark.roofline_report import format_table, plot, targets
from afigan.benchmark.roofline_steps import patch_ablation, step_rows
from afigan.quiet import quiet_third_party

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_logs():
    """The trainers' set-up lines (Detectron2 prints the whole model) would bury the table: keep
    Detectron2's logger configured (so DefaultTrainer does not set up its own) but silent."""
    quiet_third_party()
    for name in ("detectron2", "afigan"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.propagate = False
        log.handlers = [logging.NullHandler()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sizes", type=int, nargs="+", help="image short sides (long side 1.5x); default 320 512 on a CPU, 800 on CUDA"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="speed switches to compare (default: all but the compiled ones)",
    )
    p.add_argument("--parts", nargs="+", choices=["modules", "steps"], default=["modules", "steps"])
    p.add_argument("--stages", nargs="+", choices=list(STEP_CONFIGS), default=list(STEP_CONFIGS))
    p.add_argument("--batch", type=int, default=1, help="images per training step")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (after one warm-up)")
    p.add_argument(
        "--profile",
        nargs="*",
        metavar="VARIANT",
        default=None,
        help="also the top-10 operators (torch.profiler) of each step of these variants (none named: all)",
    )
    p.add_argument(
        "--patch-ablation",
        type=int,
        nargs="+",
        metavar="SIZE",
        help="instead: train the toy stage 1 with each MODEL.AFI.DIS.PATCH_SIZE (0 = whole map) and compare "
        "s/iter and the content loss",
    )
    p.add_argument("--iters", type=int, default=200, help="iterations per --patch-ablation run")
    p.add_argument("--teacher", default="", help="teacher checkpoint for --patch-ablation (default: a random one)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="output/benchmark_roofline.json")
    args = p.parse_args()
    if args.patch_ablation and args.iters < 4:
        p.error("--iters must be at least 4: Detectron2 times the iterations after its 3 warm-up ones")
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.patch_ablation:
        return patch_study(args)
    sizes = args.sizes or ([800] if args.device.startswith("cuda") else [320, 512])
    variants = args.variants or DEFAULT_VARIANTS
    rows = []
    for side in sizes:
        if "modules" in args.parts:
            rows += module_rows(side, variants, args.device, args.repeats)
        if "steps" in args.parts:
            profiled = [] if args.profile is None else (args.profile or variants)
            rows += step_rows(
                args.stages,
                side,
                args.batch,
                variants,
                os.path.join(REPO, "configs"),
                args.device,
                args.repeats,
                profile=profiled,
            )
    machine = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {args.device} ({machine}); batch {args.batch}; median of {args.repeats}; load average {load:.2f}")
    print(format_table(rows))
    checks = targets(rows)
    for t in checks:
        print(f"target @{t['short_side']}: {t['target']}: {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    for r in rows:
        for op in r.get("top_ops", []):
            print(
                f"  {r['component']} {r['variant']} @{r['short_side']}: {op['op']} {op['self_ms']:.0f} ms "
                f"({op['share']:.0%}, {op['calls']} calls)"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": machine,
                "torch": torch.__version__,
                "load_average_1min": load,
                "args": vars(args),
                "rows": rows,
                "targets": checks,
            },
            f,
            indent=2,
        )
    png = os.path.splitext(args.out)[0] + ".png"
    plot(rows, png, f"throughput relative to a plain 3x3 conv, {args.device} ({machine}), batch {args.batch}")
    print(f"wrote {args.out} and {png}")


def patch_study(args):
    rows = patch_ablation(os.path.join(REPO, "configs"), args.patch_ablation, args.iters, args.teacher, args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"toy stage 1 (configs/toy/pipeline/stage1.yaml), {args.iters} iterations, seed 0, {args.device}; "
        f"teacher {args.teacher or 'random'}; load average {load:.2f}"
    )
    print("| D patch size | s/iter | content loss (last 20 it.) | content loss (it. 0) |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['patch_size'] or 'whole map'} | {r['s_per_iter']:.3f} | {r['content_loss']:.4f} | "
            f"{r['content_loss_first']:.4f} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"torch": torch.__version__, "load_average_1min": load, "args": vars(args), "rows": rows}, f, indent=2
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
