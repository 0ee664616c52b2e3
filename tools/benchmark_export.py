#!/usr/bin/env python
"""Speed of the exported detector: Mask R-CNN FPN with the nearest, AF (afi) and DySample upsamplers,
each timed in PyTorch eager, as its TorchScript file and as its ONNX file in onnxruntime, on the same
image (median seconds per image after three untimed calls). Both files are written and checked against
eager first (tools/export_model.py's check: detections matched one-to-one), so every runtime timed
gives the same detections. Random weights, score threshold 0 and torchvision-style PIXEL_STD, so
the heads see as many boxes as a busy image gives them (the table counts the detections).

    python tools/benchmark_export.py --reference-sizes --size 800 --device cuda --repeats 10
    python tools/benchmark_export.py --size 64 --repeats 1 --kinds afi --device cpu --out output/bench_export.json

--reference-sizes: R-50, 256-channel FPN, the full interpolator, 80 classes, 100 detections per
image (toy sizes otherwise: R-18, 32 channels, 3 classes, 50 detections). Prints a Markdown table
(with the machine and its load) and writes JSON with every number; the files go next to the JSON.
"""

import argparse
import os

import torch

import afigan  # noqa: F401  (registers afigan's components)
from afigan.benchmark.export_speed import KINDS, format_table, machine, measure
from afigan.io import atomic_write_json
from afigan.quiet import quiet_third_party

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=800, help="INPUT.MIN_SIZE_TEST, the image's short side (default 800)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"upsampler kinds (default {' '.join(KINDS)})")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per runtime (after three untimed ones)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reference-sizes", action="store_true", help="R-50, 256-channel FPN, full interpolator")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="output/benchmark_export.json", metavar="JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = os.path.splitext(os.path.abspath(args.out))[0] + "_files"
    rows = measure(
        os.path.join(REPO, "configs"),
        out_dir,
        size=args.size,
        kinds=args.kinds,
        repeats=args.repeats,
        device=args.device,
        reference=args.reference_sizes,
    )
    where = machine(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: {args.device} ({where}); {'reference' if args.reference_sizes else 'toy'} sizes; short side "
        f"{args.size}; median of {args.repeats}; onnxruntime {rows[0]['onnxruntime_provider'] if rows else '-'}; "
        f"load average {load:.2f}"
    )
    print(format_table(rows, args.device))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(
        args.out,
        {"machine": where, "torch": torch.__version__, "load_average_1min": load, "args": vars(args), "rows": rows},
        indent=2,
    )
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    raise SystemExit(0 if all(r["ok"] for r in main()) else 1)
