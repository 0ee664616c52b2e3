#!/usr/bin/env python
"""Evaluate (``--eval-only``) or train any afigan / Detectron2 detector config (as stage 3 does).

python tools/run_net.py --eval-only --config-file CONFIG MODEL.WEIGHTS path/to/model.pth [TEST.AUG.ENABLED True]
python tools/run_net.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
"""

import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import launch_stage
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    launch_stage("stage3", __doc__)
