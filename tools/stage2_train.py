#!/usr/bin/env python
"""AFI-GAN stage 2: the multi-scale AF extractor. See afigan/engine/stage2.py.

python tools/stage2_train.py --config-file CONFIG [--resume] [--num-gpus N] [KEY VALUE ...]
"""

import afigan  # noqa: F401  (registers afigan's components)
from afigan.engine.cli import launch_stage

if __name__ == "__main__":
    launch_stage("stage2", __doc__)
