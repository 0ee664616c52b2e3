#!/usr/bin/env python
"""Does AFI-GAN's interpolator do what the method promises? One command that trains and measures,
on the toy set (or any registered data set): interpolation fidelity of nearest, bilinear, stage-1 G
and stage-2 interpolators against the teacher's full-resolution features; stage-3 bbox/segm AP of
one detector with each upsampler over several seeds (mean ± std, paired by seed); and the stage-1
ablations (adversarial term detached, one interpolator per level). Writes study.json, study.md,
fidelity.png and detection.png into --output-dir; re-running skips finished runs and resumes an
interrupted one (a run started with other settings stops the study with one sentence). See
afigan/benchmark/study/ and the README section "What we measured".

    python tools/study.py --quick --output-dir output/study     (4 arms, seed 0: sized for 15 min on 2 CPU cores)
    python tools/study.py --output-dir output/study             (6 arms x 3 seeds, sized for 90; reuses the quick runs)
    python tools/study.py --output-dir output/study --report-only   (tables of the finished runs, nothing trained)
"""

import shlex
import sys
from dataclasses import replace

import afigan  # noqa: F401  (registers afigan's components)
from afigan.benchmark.study import ABLATIONS, ARMS, FULL, QUICK, run_study
from afigan.engine.cli import run_tool, tool_parser
from afigan.quiet import quiet_third_party


def run(args):
    base = QUICK if args.quick else FULL
    settings = replace(base, opts=list(args.opts))
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
        "--quick",
        action="store_true",
        help=f"kinds {', '.join(QUICK.kinds)}, seed {QUICK.seeds[0]}, ablation {', '.join(QUICK.ablations)} "
        f"(a subset of the full study's runs, at the same budgets)",
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
    parser.add_argument("--dataset-test", help=f"evaluation and fidelity data set (default {FULL.dataset_test})")
    parser.add_argument("--fidelity-images", type=int, help="fidelity on the first N test images (default 0: all)")
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
