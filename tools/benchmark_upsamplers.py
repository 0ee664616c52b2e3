#!/usr/bin/env python
"""Cost of every upsampler kind at 256 channels: parameters, GFLOPs (fvcore), median latency of one
x2 call onto a P2-sized map (200x304) and of a whole FPN neck (image 800x1216), and the memory a
training step of the x2 call keeps for backward. Prints a table, writes JSON and a PNG.

    python tools/benchmark_upsamplers.py --repeats 5 --out output/benchmark_upsamplers.json
"""

import argparse
import json
import os
import platform

import torch

import afigan  # noqa: F401  (registers the necks)
from afigan.benchmark.upsamplers import VARIANTS, benchmark, format_table, plot
from afigan.quiet import quiet_third_party


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (after one warm-up)")
    p.add_argument("--p2", type=int, nargs=2, default=[200, 304], metavar=("H", "W"), help="P2 size (the image is 4x)")
    p.add_argument("--only", nargs="+", choices=[v[0] for v in VARIANTS], help="measure only these variants")
    p.add_argument("--no-neck", action="store_true", help="skip the whole-FPN measurements")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="output/benchmark_upsamplers.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark(
        p2=tuple(args.p2), device=args.device, repeats=args.repeats, neck=not args.no_neck, labels=args.only
    )
    machine = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: {args.device} ({machine}); P2 {args.p2[0]}x{args.p2[1]}; median of {args.repeats}; load "
        f"average {load:.2f}"
    )
    print(format_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": machine,
                "torch": torch.__version__,
                "load_average_1min": load,
                "args": vars(args),
                "rows": rows,
            },
            f,
            indent=2,
        )
    png = os.path.splitext(args.out)[0] + ".png"
    plot(rows, png, f"x2 upsampling onto P2 {args.p2[0]}x{args.p2[1]}, 256 channels, {args.device} ({machine})")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
