#!/usr/bin/env python
"""AFI-GAN stage 2. See afigan/engine/stage2.py.

    python tools/stage2_train.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
"""
import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import train_stage
from detectron2.engine import default_argument_parser, launch


def main(args):
    return train_stage("stage2", args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
