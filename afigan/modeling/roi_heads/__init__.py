"""CenterMask's RoI heads: CenterROIHeads, the SAG-Mask head, the MaskIoU head and the
ratio-based RoI level assignment. Importing this module registers them."""

from .center_heads import CenterROIHeads
from .maskiou_head import ROI_MASKIOU_HEAD_REGISTRY, MaskIoUHead, build_maskiou_head
from .ratio_pooler import RatioROIPooler, assign_boxes_to_levels_by_ratio
from .sag_mask_head import SpatialAttention, SpatialAttentionMaskHead
