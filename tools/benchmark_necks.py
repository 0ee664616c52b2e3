#!/usr/bin/env python
"""Inference cost of FPN / PAFPN / BiFPN with nearest, bilinear and AF-interpolator upsampling:
parameters, FLOPs and median latency of the neck alone and of a Mask R-CNN R-50 forward.

    python tools/benchmark_necks.py --size 512 768 --device cpu --repeats 3 --out output/bench_necks.json
"""

import argparse
import json
import os
import platform

import torch

import afigan  # noqa: F401  (registers the necks)
from afigan.benchmark.necks import NECKS, benchmark, format_table
from afigan.quiet import quiet_third_party


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"), help="input image size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per row (after one warm-up)")
    p.add_argument("--necks", nargs="+", default=list(NECKS), choices=list(NECKS))
    p.add_argument("--kinds", nargs="+", default=["nearest", "bilinear", "afi"])
    p.add_argument("--neck-only", action="store_true", help="skip the whole-model measurements")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="output/benchmark_necks.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark(args.necks, args.kinds, tuple(args.size), args.device, args.repeats, full=not args.neck_only)
    machine = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"device: {args.device} ({machine}); image {args.size[0]}x{args.size[1]}; median of {args.repeats}")
    print(format_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
