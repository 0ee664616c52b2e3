"""FCOS training targets: which locations are positive, for which box, and their centerness.

The rule is AdelaiDet's / CenterMask2's: a location is positive for a ground-truth box when it
lies strictly inside the box, (with centre sampling) strictly within ``radius`` strides of the
box centre along both axes, and the largest of its four distances to the box sides falls in its
level's size range; a location claimed by several boxes takes the one of smallest area.
"""

from typing import List, Sequence, Tuple

import torch
from detectron2.structures import Boxes, pairwise_point_box_distance
from torch import Tensor

__all__ = ["level_size_ranges", "fcos_targets", "centerness_targets"]

INF = 1e8


def level_size_ranges(sizes_of_interest: Sequence[float], num_levels: int) -> List[Tuple[float, float]]:
    """[(-1, s0), (s0, s1), ..., (s_last, INF)]: the range of max(l, t, r, b) for each level."""
    if len(sizes_of_interest) != num_levels - 1:
        raise ValueError(
            f"MODEL.FCOS.SIZES_OF_INTEREST needs one boundary fewer than there are levels "
            f"({num_levels - 1} for {num_levels} levels), got {list(sizes_of_interest)}."
        )
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def fcos_targets(
    points: Tensor,
    strides: Tensor,
    size_ranges: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    num_classes: int,
    center_sample: bool = True,
    radius: float = 1.5,
) -> Tuple[Tensor, Tensor]:
    """Assign ground truth to the locations of one image.

    Args:
        points: (R, 2) location coordinates (x, y) in input-image pixels, all levels concatenated.
        strides: (R,) stride of each location's level.
        size_ranges: (R, 2) [low, high] of max(l, t, r, b) accepted at each location's level.
        gt_boxes: (M, 4) XYXY boxes; gt_classes: (M,) in [0, num_classes).
        center_sample: restrict positives to ``radius * stride`` around the box centre.

    Returns:
        labels: (R,) int64, the class of the assigned box, ``num_classes`` for background;
        boxes: (R, 4) the assigned box (zeros for background).
    """
    num_points = points.shape[0]
    if gt_boxes.numel() == 0:
        return (
            torch.full((num_points,), num_classes, dtype=torch.int64, device=points.device),
            points.new_zeros((num_points, 4)),
        )
    gt_boxes = gt_boxes.to(points.dtype)
    dist = pairwise_point_box_distance(points, Boxes(gt_boxes))  # (R, M, 4): l, t, r, b
    ok = dist.min(dim=2).values > 0
    if center_sample:
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (M, 2)
        offset = (points[:, None, :] - centers[None]).abs().max(dim=2).values  # (R, M)
        ok &= offset < radius * strides[:, None]
    max_dist = dist.max(dim=2).values
    ok &= (max_dist >= size_ranges[:, :1]) & (max_dist <= size_ranges[:, 1:])
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    cost = torch.where(ok, areas[None].expand_as(ok), torch.full_like(max_dist, INF))
    min_cost, idx = cost.min(dim=1)
    labels = gt_classes.to(torch.int64)[idx].clone()
    labels[min_cost >= INF] = num_classes
    boxes = gt_boxes[idx].clone()
    boxes[min_cost >= INF] = 0
    return labels, boxes


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for (R, 2) points inside (R, 4) boxes -> (R,)."""
    l = points[:, 0] - boxes[:, 0]
    t = points[:, 1] - boxes[:, 1]
    r = boxes[:, 2] - points[:, 0]
    b = boxes[:, 3] - points[:, 1]
    lr = torch.minimum(l, r) / torch.maximum(l, r)
    tb = torch.minimum(t, b) / torch.maximum(t, b)
    return torch.sqrt((lr * tb).clamp(min=0))
