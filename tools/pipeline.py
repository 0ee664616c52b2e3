#!/usr/bin/env python
"""Run the whole progressive AFI-GAN chain of a config set: stage 0 (the nearest-neighbour teacher,
when no MODEL.GUIDE_WEIGHTS is given) -> stage 1 -> stage 2 -> stage 3 -> COCO evaluation.
Finished stages are skipped and an interrupted one resumes, so re-running the same command
continues where it stopped; a stage started with other settings stops the run with one sentence
(--retrain STAGE trains it and every later stage again). Trailing KEY VALUE pairs apply to every
stage. See afigan/engine/pipeline.py.

    python tools/pipeline.py --config-dir configs/toy/pipeline --output-dir output/toy_pipeline --make-toy-data
    python tools/pipeline.py --config-dir DIR --output-dir OUT [--num-gpus N] [--retrain STAGE] [KEY VALUE ...]
"""

import os

import afigan  # noqa: F401  (registers afigan's components)
from afigan.config import load_config
from afigan.data.datasets import toy_root
from afigan.data.toy_shapes import make_toy_dataset
from afigan.engine.cli import check_launch, run_tool, tool_parser
from afigan.engine.pipeline import PIPELINE_STEPS, Pipeline
from afigan.quiet import quiet_third_party


def run(args):
    if args.make_toy_data:
        make_toy_dataset(toy_root())
    pipeline = Pipeline(args.config_dir, args.output_dir, args, args.opts, retrain=args.retrain or "")
    # Every stage's YAML is read now, so a bad file, key or value (or --num-gpus) stops before stage 0 runs.
    for path in pipeline.files.values():
        if os.path.isfile(path):
            check_launch(args, load_config(path, args.opts))
    results = pipeline.run()
    last = "stage-3 (self-trained)" if pipeline.self_training else "stage-3"
    for name, stage_results in (("stage-0 (teacher)", pipeline.teacher_results), (last, results)):
        for task, metrics in stage_results.items():
            print(f"{name} {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "-" not in k))
    return results


def main(argv=None):
    parser = tool_parser(__doc__, hide=("--config-file", "--resume", "--eval-only"))
    parser.add_argument(
        "--config-dir", required=True, help="directory with stage1.yaml, stage2.yaml, stage3.yaml (and stage0.yaml)"
    )
    parser.add_argument(
        "--output-dir", default="output/pipeline", help="root of the stages' outputs (default output/pipeline)"
    )
    parser.add_argument("--make-toy-data", action="store_true", help="(re)generate the toy data set first")
    parser.add_argument(
        "--retrain",
        choices=PIPELINE_STEPS,
        metavar="STAGE",
        help=f"remove the outputs of STAGE and of every later step, and train them again (one of "
        f"{', '.join(PIPELINE_STEPS)}); a stage started with other settings than this run's stops the run "
        f"until it is retrained or another --output-dir is given",
    )
    args = parser.parse_args(argv)
    return run_tool(run, args, args)


if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    main()
