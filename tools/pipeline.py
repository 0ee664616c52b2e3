#!/usr/bin/env python
"""Run the whole progressive AFI-GAN chain of a config set: stage 0 (the nearest-neighbour teacher,
when no MODEL.GUIDE_WEIGHTS is given) -> stage 1 -> stage 2 -> stage 3 -> COCO evaluation.
Finished stages are skipped and an interrupted one resumes, so re-running the same command
continues where it stopped. Trailing KEY VALUE pairs apply to every stage. See afigan/engine/pipeline.py.

    python tools/pipeline.py --config-dir configs/toy/pipeline --output-dir output/toy_pipeline --make-toy-data
    python tools/pipeline.py --config-dir DIR --output-dir OUT [--num-gpus N] [KEY VALUE ...]
"""
import afigan  # noqa: F401  (registers afigan's components)
from afigan.data.datasets import toy_root
from afigan.data.toy_shapes import make_toy_dataset
from afigan.engine.cli import tool_parser
from afigan.engine.pipeline import Pipeline


def main(argv=None):
    parser = tool_parser(__doc__, hide=("--config-file", "--resume", "--eval-only"))
    parser.add_argument("--config-dir", required=True, help="directory with stage1.yaml, stage2.yaml, stage3.yaml (and stage0.yaml)")
    parser.add_argument("--output-dir", default="output/pipeline", help="root of the stages' outputs (default output/pipeline)")
    parser.add_argument("--make-toy-data", action="store_true", help="(re)generate the toy data set first")
    args = parser.parse_args(argv)
    if args.make_toy_data:
        make_toy_dataset(toy_root())
    results = Pipeline(args.config_dir, args.output_dir, args, args.opts).run()
    for task, metrics in results.items():
        print(f"stage-3 {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "-" not in k))


if __name__ == "__main__":
    main()
