#!/usr/bin/env python
"""Run the progressive AFI-GAN chain (stage 0 -> 1 -> 2 -> 3 -> eval) of a config set.

    python tools/pipeline.py --config-dir configs/toy/pipeline --output-dir output/toy_pipeline [--num-gpus N] [KEY VALUE ...]

Trailing KEY VALUE pairs apply to every stage. Finished stages are skipped; re-running the same
command after an interruption resumes. See afigan/engine/pipeline.py.
"""
import afigan  # noqa: F401  (registers afigan's components)
from afigan.data.datasets import toy_root
from afigan.data.toy_shapes import make_toy_dataset
from afigan.engine.pipeline import Pipeline
from detectron2.engine import default_argument_parser


def main():
    parser = default_argument_parser()
    parser.add_argument("--config-dir", required=True, help="directory with stage{0,1,2,3}.yaml")
    parser.add_argument("--output-dir", default="output/pipeline", help="root of the stages' outputs")
    parser.add_argument("--make-toy-data", action="store_true", help="(re)generate the toy data set first")
    args = parser.parse_args()
    if args.make_toy_data:
        make_toy_dataset(toy_root())
    results = Pipeline(args.config_dir, args.output_dir, args, args.opts).run()
    for task, metrics in results.items():
        print(f"stage-3 {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "-" not in k))


if __name__ == "__main__":
    main()
