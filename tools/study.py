#!/usr/bin/env python
"""Does AFI-GAN's interpolator do what the method promises? One command that trains and measures,
on the toy set (or any registered data set), in three parts (--part, default all):

* curves: stage 1 alone per learned kind (and AFI at three adversarial weights, and second seeds),
  trained until its curve flattens; every --curve-period iterations G's x2 of the teacher's
  half-resolution features is compared with its full-resolution features on held-out images, per
  level (L1, PSNR, high-frequency L1 and energy ratio), nearest and bilinear as references;
  fidelity_curves.png and a convergence verdict per arm;
* probe: the teacher's own RPN and heads on its full-resolution pyramid, on the half-size image's
  pyramid upsampled by nearest, bilinear and each converged G, and on the half-size pyramid alone:
  COCO AP per arm with a paired bootstrap CI of each arm's difference to bilinear;
* detection: stage-3 bbox/segm AP of one detector with each upsampler over several seeds, the
  stage-1/2 fidelity table and the stage-1 ablations.

Writes study.json, study.md and the charts into --output-dir; re-running skips finished runs and
resumes an interrupted one (a run started with other settings stops the study with one sentence).
See afigan/benchmark/study/ and docs/results.md, "What we measured".

    python tools/study.py --quick --output-dir output/study_quick   (every part, shrunk: 10 min on 2 CPU cores)
    python tools/study.py --part curves probe --output-dir output/study   (sized for 45 min on 2 CPU cores)
    python tools/study.py --part detection --output-dir output/study
    python tools/study.py --output-dir output/study --report-only    (tables of the finished runs, nothing trained)
"""

import shlex
import sys
from dataclasses import replace

import afigan  # noqa: F401  (registers afigan's components)
from afigan.benchmark.study import ABLATIONS, ARMS, CURVE_KINDS, FULL, PARTS, QUICK, run_study
from afigan.engine.cli import run_tool, tool_parser
from afigan.quiet import quiet_third_party


def run(args):
    base = QUICK if args.quick else FULL
    parts = PARTS if "all" in args.part else tuple(p for p in PARTS if p in args.part)
    settings = replace(base, opts=list(args.opts), parts=parts)
    for key in (
        "kinds",
        "seeds",
        "ablations",
        "max_iter",
        "config_dir",
        "dataset_train",
        "dataset_test",
        "fidelity_images",
    ):
        value = getattr(args, key)
        if value is not None:
            settings = replace(settings, **{key: tuple(value) if isinstance(value, list) else value})
    curves = settings.curves
    for flag, key in (("curve_iters", "iters"), ("curve_period", "period"), ("curve_kinds", "kinds")):
        value = getattr(args, flag)
        if value is not None:
            curves = replace(curves, **{key: tuple(value) if isinstance(value, list) else value})
    if args.second_seed is not None:
        curves = replace(curves, second_seed=args.second_seed == "on")
    if args.adv_weights is not None:
        curves = replace(curves, adv_weights=tuple(args.adv_weights))
    probe = settings.probe
    for flag, key in (("probe_images", "images"), ("resamples", "resamples"), ("probe_dataset", "dataset")):
        value = getattr(args, flag)
        if value is not None:
            probe = replace(probe, **{key: value})
    settings = replace(settings, curves=curves, probe=probe)
    command = " ".join(shlex.quote(a) for a in ["python", "tools/study.py"] + sys.argv[1:])
    paths = run_study(settings, args.output_dir, args, command, report_only=args.report_only)
    for what, path in paths.items():
        print(f"[study] {what}: {path}")
    return paths


def main(argv=None):
    parser = tool_parser(__doc__, hide=("--config-file", "--resume", "--eval-only"))
    parser.add_argument(
        "--output-dir", default="output/study", help="where every run and the outputs go (default output/study)"
    )
    parser.add_argument(
        "--part",
        nargs="+",
        default=["all"],
        choices=list(PARTS) + ["all"],
        help="the parts to run, always in the order curves, probe, detection (default all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"detection: kinds {', '.join(QUICK.kinds)}, seed {QUICK.seeds[0]}, no ablation, stage-3 budget "
        f"{QUICK.max_iter[3]} (give it its own --output-dir); curves: {', '.join(QUICK.curves.kinds)} over "
        f"{QUICK.curves.iters} iterations, one seed; probe: {QUICK.probe.images} images",
    )
    parser.add_argument("--kinds", nargs="+", choices=list(ARMS), help=f"detection arms (full: {' '.join(FULL.kinds)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="stage-3 SEED values (full: 0 1 2)")
    parser.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), help="stage-1 ablations (full: adv shared)")
    parser.add_argument(
        "--max-iter",
        nargs=4,
        type=int,
        metavar=("S0", "S1", "S2", "S3"),
        help=f"SOLVER.MAX_ITER of stages 0-3, the YAML's schedule compressed to it; 0 keeps the YAML's "
        f"(default {' '.join(map(str, FULL.max_iter))})",
    )
    parser.add_argument(
        "--config-dir",
        help=f"the AFI config set (stage0-3.yaml); learned kind K uses <dir>_K (default {FULL.config_dir})",
    )
    parser.add_argument("--dataset-train", help=f"training data set of every run (default {FULL.dataset_train})")
    parser.add_argument(
        "--dataset-test", help=f"evaluation, fidelity and curves data set (default {FULL.dataset_test})"
    )
    parser.add_argument("--fidelity-images", type=int, help="fidelity and curves on the first N test images (0: all)")
    parser.add_argument(
        "--curve-iters", type=int, help=f"stage-1 iterations of each curve arm (full: {FULL.curves.iters})"
    )
    parser.add_argument(
        "--curve-period", type=int, help=f"iterations between two evaluations of G (full: {FULL.curves.period})"
    )
    parser.add_argument(
        "--curve-kinds",
        nargs="+",
        choices=CURVE_KINDS,
        help=f"learned kinds of the curves (full: {' '.join(CURVE_KINDS)})",
    )
    parser.add_argument(
        "--adv-weights", nargs="*", help="further AFI curve arms at these MODEL.AFI.ADV_WEIGHT values (full: 0 1e-2)"
    )
    parser.add_argument(
        "--second-seed", choices=("on", "off"), help="AFI and the best other kind again with SEED 1 (full: on)"
    )
    parser.add_argument("--probe-images", type=int, help="the probe on the first N images (full: 0, all 256)")
    parser.add_argument("--probe-dataset", help=f"the probe's data set (default {FULL.probe.dataset})")
    parser.add_argument("--resamples", type=int, help=f"paired bootstrap resamples (default {FULL.probe.resamples})")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables and charts of the runs already finished (an unfinished study)",
    )
    args = parser.parse_args(argv)
    return run_tool(run, args, args)


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
