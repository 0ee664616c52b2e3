"""Bottom-up networks as Detectron2 backbones: ResNeSt and Swin (their neck builders live in
:mod:`afigan.modeling.necks.builders`)."""

from . import (
    resnest,  # noqa: F401
    swin,  # noqa: F401
)
