"""afigan: learned feature-pyramid upsampling (AFI-GAN) and feature-enhanced backbones for Detectron2.

``import afigan`` works without Detectron2 (the pure-PyTorch ``afigan.layers`` and the toy data
generator). When Detectron2 is importable, importing ``afigan`` also registers every component
(backbones, necks, meta-architectures, heads, data sets) in Detectron2's registries, and
``afigan.add_afigan_config`` is available.
"""

__version__ = "0.1.0"

import warnings

from . import layers  # noqa: F401  (pure PyTorch)

try:
    import detectron2  # noqa: F401
except ImportError:  # pragma: no cover - exercised on machines without Detectron2
    HAS_DETECTRON2 = False
else:
    HAS_DETECTRON2 = True

if HAS_DETECTRON2:
    with warnings.catch_warnings():
        # fvcore.nn and Detectron2's box regression script functions with torch.jit.script at import
        # time, which recent torch deprecates with a FutureWarning on every run; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import detectron2.modeling  # noqa: F401
        import fvcore.nn  # noqa: F401
    from . import registration as _registration  # noqa: F401  (fills Detectron2's registries)
    from .config import add_afigan_config  # noqa: F401


def __getattr__(name):
    if name == "add_afigan_config":
        raise ImportError(
            "afigan.add_afigan_config needs Detectron2, which is not importable here; install it from "
            "source first: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
        )
    raise AttributeError(f"module 'afigan' has no attribute {name!r}")
