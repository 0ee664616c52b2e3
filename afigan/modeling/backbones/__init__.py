"""Bottom-up networks wrapped as Detectron2 backbones, and their neck builders."""
from . import resnest  # noqa: F401
from . import swin  # noqa: F401
from . import enhanced  # noqa: F401
