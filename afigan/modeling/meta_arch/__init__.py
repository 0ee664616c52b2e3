"""The AFI-GAN meta-architectures: the feature-only teacher (stages 1-2) and the stage-2 AF
extractor. Importing this module registers them."""

from .af_extractor import GeneralizedRCNN_AFExtractor
from .teacher import build_guide_model

__all__ = ["GeneralizedRCNN_AFExtractor", "build_guide_model"]
