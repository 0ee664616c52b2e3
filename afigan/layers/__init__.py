"""Pure-PyTorch building blocks of afigan. Nothing here imports Detectron2."""

from .af_interpolator import AFInterpolator, ResidualDenseBlock, ResidualInResidualDenseBlock
from .carafe import CARAFE, carafe_reassemble
from .discriminator import FeaturePatchDiscriminator
from .dysample import DySample
from .fade import FADE
from .fe_regularizers import FeatureEnhancementRegularizer, frobenius_term, stage_weights, variance_term
from .learned_baselines import DeconvUpsampler, PixelShuffleUpsampler
from .losses import crop_to_common, discriminator_loss, frozen_parameters, generator_loss, random_window
from .shape import check_feature_map, fit_to, resize_to
from .state_dict import check_state_dict_fits
from .upsample import (
    InterpolateUpsampler,
    build_upsampler,
    is_guided,
    register_upsampler,
    unregister_upsampler,
    upsampler_config_node,
    upsampler_kind_of,
    upsampler_kinds,
    upsampler_kwargs,
)

__all__ = [k for k in dir() if not k.startswith("_")]
