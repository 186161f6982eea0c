"""Boxes for grounding: format conversions, paired IoU / GIoU, accuracy at IoU 0.5, bin tokens."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.boxes import (
    box_iou,
    cxcywh_to_xyxy,
    dequantize_box,
    generalized_box_iou,
    grounding_accuracy,
    quantize_box,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

BINS_384 = 385  # image_size 384 + 1, as mPLUG's grounding head


def boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- conversions --------------------------------------------------------------------------------


def test_xywh_to_xyxy_adds_width_and_height():
    # (1, 2, w=3, h=4) -> x2 = 1 + 3, y2 = 2 + 4
    assert xywh_to_xyxy(boxes([1, 2, 3, 4])).tolist() == [[1, 2, 4, 6]]
    assert xyxy_to_xywh(boxes([1, 2, 4, 6])).tolist() == [[1, 2, 3, 4]]


def test_cxcywh_to_xyxy_spans_half_the_size_each_side():
    # centre (0.5, 0.5), size 0.2 x 0.4 -> x 0.4..0.6, y 0.3..0.7
    assert cxcywh_to_xyxy(boxes([0.5, 0.5, 0.2, 0.4])) == pytest.approx(boxes([0.4, 0.3, 0.6, 0.7]))
    assert xyxy_to_cxcywh(boxes([0.4, 0.3, 0.6, 0.7])) == pytest.approx(boxes([0.5, 0.5, 0.2, 0.4]))


def test_conversions_keep_leading_dimensions():
    batch = torch.rand(2, 3, 4)
    assert cxcywh_to_xyxy(batch).shape == (2, 3, 4)
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(batch)), batch, atol=1e-6)
    assert torch.allclose(xyxy_to_xywh(xywh_to_xyxy(batch)), batch, atol=1e-6)


def test_a_tensor_without_four_coordinates_is_an_error():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\), got \(2, 3\)"):
        xywh_to_xyxy(torch.zeros(2, 3))


# --- IoU and GIoU -------------------------------------------------------------------------------


def test_identical_boxes_have_iou_and_giou_one():
    a = boxes([0, 0, 2, 3])
    assert box_iou(a, a).tolist() == [1.0]
    assert generalized_box_iou(a, a).tolist() == [1.0]


def test_disjoint_boxes_have_iou_zero_and_negative_giou():
    # union 1 + 1 = 2, enclosing box (0,0)-(3,1) = 3: GIoU = 0 - (3 - 2) / 3 = -1/3
    a, b = boxes([0, 0, 1, 1]), boxes([2, 0, 3, 1])
    assert box_iou(a, b).tolist() == [0.0]
    assert generalized_box_iou(a, b) == pytest.approx([-1 / 3])


def test_far_apart_boxes_approach_giou_minus_one():
    # union 2, enclosing 100 x 100 = 10000: GIoU = -(10000 - 2) / 10000
    a, b = boxes([0, 0, 1, 1]), boxes([99, 99, 100, 100])
    assert generalized_box_iou(a, b) == pytest.approx([-0.9998])


def test_box_shifted_by_half_its_width():
    # overlap 1 x 2 = 2, union 4 + 4 - 2 = 6: IoU 1/3; enclosing 3 x 2 = 6 = union: GIoU = IoU
    a, b = boxes([0, 0, 2, 2]), boxes([1, 0, 3, 2])
    assert box_iou(a, b) == pytest.approx([1 / 3])
    assert generalized_box_iou(a, b) == pytest.approx([1 / 3])


def test_diagonal_overlap_giou_subtracts_the_empty_part_of_the_enclosing_box():
    # overlap 1 x 1 = 1, union 4 + 4 - 1 = 7: IoU 1/7; enclosing 3 x 3 = 9:
    # GIoU = 1/7 - (9 - 7) / 9 = (9 - 14) / 63 = -5/63
    a, b = boxes([0, 0, 2, 2]), boxes([1, 1, 3, 3])
    assert box_iou(a, b) == pytest.approx([1 / 7])
    assert generalized_box_iou(a, b) == pytest.approx([-5 / 63])


def test_contained_box_iou_is_the_area_ratio():
    # inner 2 x 2 = 4 inside outer 4 x 4 = 16: IoU 4/16; enclosing = outer = union: GIoU = IoU
    outer, inner = boxes([0, 0, 4, 4]), boxes([1, 1, 3, 3])
    assert box_iou(outer, inner) == pytest.approx([0.25])
    assert generalized_box_iou(outer, inner) == pytest.approx([0.25])


def test_zero_area_box_has_iou_zero():
    # a line x = 1, y 1..3 against (0,0)-(2,2): no area in common, union 4 -> IoU 0;
    # enclosing (0,0)-(2,3) = 6: GIoU = 0 - (6 - 4) / 6 = -1/3
    line, square = boxes([1, 1, 1, 3]), boxes([0, 0, 2, 2])
    assert box_iou(line, square).tolist() == [0.0]
    assert generalized_box_iou(line, square) == pytest.approx([-1 / 3])


def test_two_identical_points_give_zero_not_nan():
    # union 0 and enclosing area 0: IoU 0 and no GIoU penalty
    point = boxes([1, 1, 1, 1])
    assert box_iou(point, point).tolist() == [0.0]
    assert generalized_box_iou(point, point).tolist() == [0.0]


def test_giou_gradient_is_finite_for_degenerate_boxes():
    pred = boxes([1, 1, 1, 1], [0, 0, 1, 1]).requires_grad_()
    target = boxes([1, 1, 1, 1], [0, 0, 2, 2])
    (1 - generalized_box_iou(pred, target)).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_iou_is_paired_elementwise():
    a = boxes([0, 0, 2, 2], [0, 0, 4, 4])
    b = boxes([0, 0, 2, 2], [1, 1, 3, 3])
    assert box_iou(a, b) == pytest.approx([1.0, 0.25])  # row i with row i, not all pairs


def test_paired_boxes_must_have_the_same_shape():
    with pytest.raises(ValueError, match=r"same shape, got a \(2, 4\) and b \(3, 4\)"):
        box_iou(torch.zeros(2, 4), torch.zeros(3, 4))


def test_integer_pixel_boxes_are_scored_as_floats():
    a = torch.tensor([[0, 0, 2, 2]])
    b = torch.tensor([[1, 0, 3, 2]])
    assert box_iou(a, b) == pytest.approx([1 / 3])


# --- grounding accuracy -------------------------------------------------------------------------


def test_grounding_accuracy_counts_iou_at_least_the_threshold():
    gt = boxes([0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2])
    pred = boxes(
        [0, 0, 2, 2],  # IoU 1
        [0, 0, 2, 1],  # overlap 2, union 4: IoU exactly 0.5 -> counts
        [1, 0, 3, 2],  # IoU 1/3
        [5, 5, 6, 6],  # IoU 0
    )
    assert grounding_accuracy(pred, gt) == 0.5  # 2 of 4
    assert grounding_accuracy(pred, gt, threshold=0.3) == 0.75  # 1/3 >= 0.3 too


def test_grounding_accuracy_rejects_a_threshold_outside_0_1():
    with pytest.raises(ValueError, match="in \\[0, 1\\], got 50"):
        grounding_accuracy(boxes([0, 0, 1, 1]), boxes([0, 0, 1, 1]), threshold=50)


# --- bin tokens ---------------------------------------------------------------------------------


def test_quantize_maps_unit_interval_to_bins():
    # round(v * 384): 0 -> 0, 0.5 -> 192, 1 -> 384, 0.3 -> round(115.2) = 115
    tokens = quantize_box(torch.tensor([0.0, 0.5, 1.0, 0.3]), BINS_384)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [0, 192, 384, 115]


def test_quantize_clamps_coordinates_outside_the_image():
    assert quantize_box(torch.tensor([-0.1, 1.2, 0.0, 1.0]), BINS_384).tolist() == [0, 384, 0, 384]


def test_dequantize_divides_by_the_last_bin():
    coords = dequantize_box(torch.tensor([0, 192, 384, 115]), BINS_384)
    assert coords == pytest.approx(torch.tensor([0.0, 0.5, 1.0, 115 / 384]))


def test_round_trip_error_is_at_most_half_a_bin():
    torch.manual_seed(0)
    coords = torch.rand(1000, 4)
    back = dequantize_box(quantize_box(coords, BINS_384), BINS_384)
    half_bin = 1 / (2 * (BINS_384 - 1))  # 1/768
    assert (back - coords).abs().max().item() <= half_bin + 1e-6  # + float32 rounding


def test_dequantize_rejects_tokens_outside_the_bins():
    with pytest.raises(ValueError, match=r"in \[0, 384\] .* from 0 to 30522"):
        dequantize_box(torch.tensor([0, 1, 2, 30522]), BINS_384)


def test_dequantize_rejects_float_tokens():
    with pytest.raises(ValueError, match="integer tensor"):
        dequantize_box(torch.tensor([0.0, 1.0, 2.0, 3.0]), BINS_384)


def test_quantize_rejects_nan_coordinates():
    with pytest.raises(ValueError, match="NaN"):
        quantize_box(torch.tensor([0.5, float("nan"), 0.1, 0.1]), BINS_384)


def test_bins_must_be_at_least_two():
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        quantize_box(torch.tensor([0.5, 0.5, 0.1, 0.1]), 1)
