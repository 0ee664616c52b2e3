#!/usr/bin/env python
"""AFI-GAN stage 2: the multi-scale AF extractor. See afigan/engine/stage2.py.

python tools/stage2_train.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
"""

import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import launch_stage
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    launch_stage("stage2", __doc__)
