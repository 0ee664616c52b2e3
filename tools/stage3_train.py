#!/usr/bin/env python
"""AFI-GAN stage 3: the target detector. See afigan/engine/detector.py.

python tools/stage3_train.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
python tools/stage3_train.py --eval-only --config-file CONFIG MODEL.WEIGHTS path/to/model_final.pth
"""

import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import launch_stage
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    launch_stage("stage3", __doc__)
