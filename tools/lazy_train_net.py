#!/usr/bin/env python
"""Train or evaluate a LazyConfig (.py) config, e.g. configs/toy/fe_fcos_R_18_FPN_lazy.py: the
flags of Detectron2's tools/lazyconfig_train_net.py (which a pip-installed Detectron2 lacks), with
trailing key=value overrides. See afigan/engine/lazy.py.

    python tools/lazy_train_net.py --config-file configs/toy/fe_fcos_R_18_FPN_lazy.py [--resume] [train.max_iter=20]
    python tools/lazy_train_net.py --eval-only --config-file CONFIG train.init_checkpoint=path/to/model_final.pth
"""

import afigan  # noqa: F401  (registers afigan's components and data sets)
from afigan.engine.cli import launch_lazy
from afigan.quiet import quiet_third_party

if __name__ == "__main__":
    quiet_third_party()  # notes of torch and Detectron2 a user cannot act on
    launch_lazy(__doc__)
