#!/usr/bin/env python
"""Seconds per iteration and peak memory of stages 1, 2, 3 and of plain Detectron2 training of
the same detector with a nearest-neighbour FPN, on the toy data set.

    python tools/benchmark_training.py --size 160 --batch 2 --iters 8 --device cpu --out output/bench_training.json
    python tools/benchmark_training.py --reference-sizes --size 800 --batch 2 --device cuda [--amp]

Each stage runs in its own process so its peak memory is its own.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

from afigan.quiet import quiet_third_party

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=160, help="short side of the training images")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="iterations per stage (the first two are not timed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", nargs="+", default=["plain_nn", "stage1", "stage2", "stage3"])
    p.add_argument("--reference-sizes", action="store_true", help="R-50, 256-channel FPN, full interpolator and D")
    p.add_argument("--amp", action="store_true", help="SOLVER.AMP.ENABLED (CUDA only)")
    p.add_argument("--out", default="output/benchmark_training.json")
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: measure one stage in this process
    args = p.parse_args()
    if args.single:
        import afigan  # noqa: F401
        from afigan.benchmark.training import measure

        row = measure(
            args.single,
            os.path.join(REPO, "configs"),
            args.size,
            args.batch,
            args.iters,
            args.device,
            args.reference_sizes,
            args.amp,
        )
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for stage in args.stages:
        cmd = (
            [
                sys.executable,
                os.path.abspath(__file__),
                "--single",
                stage,
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
                "--iters",
                str(args.iters),
                "--device",
                args.device,
            ]
            + (["--reference-sizes"] if args.reference_sizes else [])
            + (["--amp"] if args.amp else [])
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"benchmark of {stage} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    print(
        f"device {args.device}, image short side {args.size}, batch {args.batch}, {args.iters} iterations, "
        f"{'reference' if args.reference_sizes else 'toy'} sizes, AMP {args.amp}"
    )
    print("| stage | s/iter (median) | peak memory (MiB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['s_per_iter']:.3f} | {r['peak_mem_mib']:.0f} ({r['memory_kind']}) |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
