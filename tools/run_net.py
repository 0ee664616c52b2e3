#!/usr/bin/env python
"""Evaluate (``--eval-only``) or train any afigan / Detectron2 detector config.

    python tools/run_net.py --eval-only --config-file CONFIG MODEL.WEIGHTS path/to/model.pth [TEST.AUG.ENABLED True]
    python tools/run_net.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
"""
import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import run_net
from detectron2.engine import default_argument_parser, launch

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(run_net, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
