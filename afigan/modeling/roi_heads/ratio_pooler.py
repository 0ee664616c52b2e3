"""RoI pooling with CenterMask's scale-adaptive level assignment (``ASSIGN_CRITERION "ratio"``).

CenterMask (eq. 2) picks the level of a box from the ratio of image area to box area,
``k = ceil(k_max - log2(A_image / A_box))``, clamped to the available levels, so the level
follows the box's size relative to the image rather than FPN's fixed 224-pixel canonical
size. With "area" the pooler is Detectron2's ``ROIPooler`` unchanged.
"""

from typing import List, Sequence, Tuple

import torch
from detectron2.layers import cat, nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torch import Tensor

__all__ = ["ASSIGN_CRITERIA", "assign_boxes_to_levels_by_ratio", "RatioROIPooler"]

ASSIGN_CRITERIA = ("area", "ratio")


def assign_boxes_to_levels_by_ratio(
    box_lists: List[Boxes], image_sizes: Sequence[Tuple[int, int]], min_level: int, max_level: int
) -> Tensor:
    """Level index (offset from ``min_level``) of every box, all images concatenated -> (M,) int64.

    ``image_sizes[i]`` = (H, W) of image i, the size the boxes are given in (before padding).
    """
    # Each image's area divided by its boxes' areas (a 0-dim tensor over a vector: the same float32
    # divisions as a filled vector). No len() or float(): under tracing both sizes are traced values.
    ratios = cat(
        [
            torch.as_tensor(h * w, device=b.tensor.device).to(torch.float32) / b.area()
            for b, (h, w) in zip(box_lists, image_sizes)
        ]
    )
    # A zero-area box gives log2(inf) = inf -> the finest level after clamping, like FPN's rule.
    levels = torch.ceil(max_level - torch.log2(ratios))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


class RatioROIPooler(ROIPooler):
    """Detectron2's ``ROIPooler`` with a choice of level assignment.

    Args: those of ``ROIPooler``, plus ``assign_criterion``: "area" (FPN) or "ratio" (CenterMask).
    ``forward(x, box_lists, image_sizes)``: L maps (N, C, Hl, Wl), N Boxes and N (H, W) ->
    (M, C, output_size, output_size) with M the total number of boxes.
    """

    def __init__(self, *args, assign_criterion: str = "area", **kwargs):
        super().__init__(*args, **kwargs)
        if assign_criterion not in ASSIGN_CRITERIA:
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.ASSIGN_CRITERION must be one of {ASSIGN_CRITERIA}, got {assign_criterion!r}."
            )
        self.assign_criterion = assign_criterion

    def forward(self, x: List[Tensor], box_lists: List[Boxes], image_sizes: Sequence[Tuple[int, int]] = None) -> Tensor:
        if self.assign_criterion == "area" or len(self.level_poolers) == 1:
            return super().forward(x, box_lists)
        if image_sizes is None or len(image_sizes) != len(box_lists):
            raise ValueError("The 'ratio' level assignment needs one (H, W) image size per image.")
        pooler_fmt_boxes = convert_boxes_to_pooler_format(box_lists)
        levels = assign_boxes_to_levels_by_ratio(box_lists, image_sizes, self.min_level, self.max_level)
        # shape[0], not len(): a traced value under tracing, so the graph fits any number of boxes.
        output = x[0].new_zeros((pooler_fmt_boxes.shape[0], x[0].shape[1], *self.output_size))
        for level, pooler in enumerate(self.level_poolers):
            inds = nonzero_tuple(levels == level)[0]
            output.index_put_((inds,), pooler(x[level], pooler_fmt_boxes[inds]))
        return output
