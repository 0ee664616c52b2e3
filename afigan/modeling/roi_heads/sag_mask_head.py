"""CenterMask's spatial-attention-guided mask head (SAG-Mask), on Detectron2's mask head.

SAG-Mask is Detectron2's ``MaskRCNNConvUpsampleHead`` with one spatial attention between the
last 3x3 conv and the deconv: the channel-wise mean and max of the RoI features go through a
3x3 conv and a sigmoid, and the result multiplies the features. Losses and inference are
Detectron2's (``mask_rcnn_loss`` / ``mask_rcnn_inference``). Module names follow CenterMask2
(``mask_fcn{k}``, ``spatialAtt``, ``deconv``, ``predictor``), so its mask-head weights load.
"""

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from torch import Tensor, nn

__all__ = ["SpatialAttention", "SpatialAttentionMaskHead"]


class SpatialAttention(nn.Module):
    """x * sigmoid(conv3x3([mean_c(x), max_c(x)])): (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if kernel_size not in (3, 7):
            raise ValueError(f"SpatialAttention kernel_size must be 3 or 7, got {kernel_size}.")
        self.conv = Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        weight_init.c2_msra_fill(self.conv)

    def attention(self, x: Tensor) -> Tensor:
        """The attention map (N, 1, H, W) in (0, 1)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


@ROI_MASK_HEAD_REGISTRY.register()
class SpatialAttentionMaskHead(MaskRCNNConvUpsampleHead):
    """SAG-Mask. Config and arguments as ``MaskRCNNConvUpsampleHead`` (``ROI_MASK_HEAD.NUM_CONV``,
    ``CONV_DIM``, ``NORM``, ``CLS_AGNOSTIC_MASK``); ``layers``: RoI features (B, C, S, S) ->
    mask logits (B, K, 2S, 2S), K = 1 when class-agnostic."""

    @configurable
    def __init__(self, input_shape, *, num_classes, conv_dims, conv_norm="", **kwargs):
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=conv_norm, **kwargs)
        self.spatialAtt = SpatialAttention()

    def layers(self, x: Tensor) -> Tensor:
        # Explicit order: nn.Sequential iteration would run the attention (registered last) at the end.
        for conv in self.conv_norm_relus:
            x = conv(x)
        x = self.spatialAtt(x)
        x = self.deconv_relu(self.deconv(x))
        return self.predictor(x)
