"""afigan/analysis/export_match.py: exported and PyTorch detections matched as sets (pure tensors).
Near-tied detections in another order, and a near-tie at a cut, are no difference; a moved box, a
missing confident detection and a changed mask are."""

import pytest
import torch

from afigan.analysis.export_match import (
    BOX_TOLERANCE_PX,
    CUT_EPSILON,
    MASK_TOLERANCE,
    SCORE_TOLERANCE,
    box_iou,
    match_detections,
    size_table,
)


def _dets(boxes, scores, classes, masks=None):
    d = {
        "pred_boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "pred_classes": torch.tensor(classes, dtype=torch.int64),
    }
    if masks is not None:
        d["pred_masks"] = masks
    return d


def _permuted(d, order):
    return {k: v[order] for k, v in d.items()}


BOXES = [[10.0, 10.0, 50.0, 60.0], [100.0, 20.0, 140.0, 90.0], [30.0, 5.0, 70.0, 45.0]]


def test_tied_scores_in_opposite_orders_match():
    expected = _dets(BOXES, [0.25, 0.25, 0.9], [1, 1, 0])
    actual = _permuted(expected, [1, 0, 2])  # the index-by-index comparison called this 134 px
    check = match_detections(expected, actual, size=(160, 213))
    assert check.ok, check.problems
    assert (check.pytorch, check.exported, check.matched) == (3, 3, 3)
    assert check.box_px == 0.0 and check.score == 0.0 and check.unmatched == []


def test_float_rounding_passes():
    expected = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0])
    actual = {k: v.clone() for k, v in expected.items()}
    actual["pred_boxes"] += 1e-3
    actual["scores"] -= 2e-5
    check = match_detections(expected, actual)
    assert check.ok and check.box_px == pytest.approx(1e-3, rel=1e-2) and check.score == pytest.approx(2e-5, rel=1e-2)


def test_a_box_moved_by_two_pixels_fails():
    expected = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0])
    actual = {k: v.clone() for k, v in expected.items()}
    actual["pred_boxes"][1, 0] += 2.0
    check = match_detections(expected, actual)
    assert not check.ok and check.matched == 3  # still the same detection (IoU 0.95), but moved
    assert check.box_px == pytest.approx(2.0)
    assert check.problems == [f"a matched box differs by 2 px (> {BOX_TOLERANCE_PX:g})"]


def test_zero_area_boxes_match_their_copies_only():
    # Boxes clipped to the image border collapse to a line: IoU 0 even with their own copy.
    flat = [[0.0, 10.0, 0.0, 60.0], [100.0, 90.0, 140.0, 90.0], *BOXES]
    expected = _dets(flat, [0.8, 0.7, 0.25, 0.5, 0.9], [2, 2, 1, 1, 0])
    actual = _permuted(expected, [1, 0, 4, 3, 2])
    check = match_detections(expected, actual)
    assert check.ok, check.problems
    assert check.matched == 5 and check.box_px == 0.0
    moved = {k: v.clone() for k, v in expected.items()}
    moved["pred_boxes"][0, 1] += 2.0  # the flat box moved: no partner left, and confident
    check = match_detections(expected, moved)
    assert not check.ok and check.matched == 4


def test_a_changed_score_fails():
    expected = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0])
    actual = {k: v.clone() for k, v in expected.items()}
    actual["scores"][2] = 0.9 + 10 * SCORE_TOLERANCE
    check = match_detections(expected, actual)
    assert not check.ok and check.problems[0].startswith("a matched score differs by 0.001")


def test_same_box_of_another_class_does_not_match():
    expected = _dets(BOXES[:1], [0.9], [0])
    actual = _dets(BOXES[:1], [0.9], [2])
    check = match_detections(expected, actual)
    assert check.matched == 0 and len(check.unmatched) == 2 and not check.ok


def test_a_near_tie_at_the_top_k_cut_passes():
    # Both runtimes keep 2 (top-k 2); the second place is a near-tie that each broke its own way.
    expected = _dets([BOXES[0], BOXES[1]], [0.9, 0.30002], [0, 1])
    actual = _dets([BOXES[0], BOXES[2]], [0.9, 0.30001], [0, 1])
    check = match_detections(expected, actual, topk=2)
    assert check.ok, check.problems
    assert check.matched == 1 and [u["near_cut"] for u in check.unmatched] == [True, True]
    assert [u["runtime"] for u in check.unmatched] == ["PyTorch", "exported"]
    # Without a top-k cut (or with a list that is not full) the same difference is real.
    assert not match_detections(expected, actual).ok
    assert not match_detections(expected, actual, topk=3).ok


def test_a_near_tie_at_the_score_threshold_passes():
    expected = _dets([BOXES[0], BOXES[1]], [0.9, 0.0502], [0, 1])
    actual = _dets([BOXES[0]], [0.9], [0])
    assert match_detections(expected, actual, score_threshold=0.05).ok
    far = _dets([BOXES[0], BOXES[1]], [0.9, 0.05 + 2 * CUT_EPSILON], [0, 1])
    assert not match_detections(far, actual, score_threshold=0.05).ok


def test_a_missing_confident_detection_fails():
    expected = _dets(BOXES, [0.25, 0.8, 0.9], [1, 1, 0])
    actual = _permuted(expected, [0, 2])
    check = match_detections(expected, actual, score_threshold=0.05, topk=100)
    assert not check.ok and check.matched == 2
    assert check.unmatched == [
        {"runtime": "PyTorch", "class": 1, "score": pytest.approx(0.8), "box": BOXES[1], "near_cut": False}
    ]
    assert check.problems == [
        f"PyTorch detection of class 1 with score 0.8 has no partner and is not within {CUT_EPSILON:g} of a cut"
    ]


def test_a_mask_difference_is_detected():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 1, 14, 14, generator=g)
    expected = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0], masks)
    actual = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0], masks.clone())
    assert match_detections(expected, actual).mask == 0.0
    actual["pred_masks"][2, 0, :7] = 1 - actual["pred_masks"][2, 0, :7]  # half a mask flipped
    check = match_detections(expected, _permuted(actual, [2, 0, 1]))
    want = float((masks[2] - actual["pred_masks"][2]).abs().mean())
    assert check.mask == pytest.approx(want) and want > MASK_TOLERANCE
    assert not check.ok and check.problems[0].startswith("a matched mask differs by")


def test_empty_lists_match():
    empty = _dets(torch.zeros(0, 4).tolist(), [], [])
    check = match_detections(empty, empty)
    assert check.ok and check.matched == 0 and check.box_px is None


def test_box_iou_is_exact():
    iou = box_iou(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 0.0, 15.0, 10.0], [20, 20, 30, 30]]))
    assert iou.tolist() == [[pytest.approx(1 / 3), 0.0]]


def test_size_table_has_one_row_per_size():
    expected = _dets(BOXES, [0.25, 0.5, 0.9], [1, 1, 0])
    moved = {k: v.clone() for k, v in expected.items()}
    moved["pred_boxes"][0] += 3.0
    checks = [
        match_detections(expected, expected, size=(64, 85), image="the sample"),
        match_detections(expected, moved, size=(49, 65), image="resized"),
    ]
    lines = size_table(checks).splitlines()
    assert lines[0].split()[:7] == ["size", "PyTorch", "exported", "matched", "box", "px", "score"]
    assert lines[1].split() == ["64x85", "3", "3", "3", "0", "0", "-", "0", "(0)", "ok", "the", "sample"]
    assert lines[2].split() == ["49x65", "3", "3", "3", "3", "0", "-", "0", "(0)", "DIFFERENT", "resized"]
