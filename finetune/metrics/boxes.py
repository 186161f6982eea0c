"""Bounding boxes for visual grounding: format conversions, paired IoU and GIoU, accuracy at an
IoU threshold, and the box <-> bin-token quantisation the decoder predicts.

Boxes are tensors (..., 4). Formats: xyxy = (x1, y1, x2, y2), xywh = (x1, y1, w, h) as in COCO /
RefCOCO annotations, cxcywh = (cx, cy, w, h) as mPLUG predicts, normalised to [0, 1].

Degenerate boxes (zero width or height) have area 0 and IoU 0 with anything, without NaN in the
value or its gradient, so 1 - GIoU is safe as a loss on early, collapsed predictions. A box with
x2 < x1 (or y2 < y1) is treated as having area 0.
"""

from __future__ import annotations

import torch

BOX_DIM = 4


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of boxes (..., 4), got {type(boxes).__name__}"
        )
    if boxes.dim() == 0 or boxes.shape[-1] != BOX_DIM:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"paired boxes must have the same shape, got a {tuple(a.shape)} and b "
            f"{tuple(b.shape)}; box i of a is compared with box i of b"
        )


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, w, h) -> (x1, y1, x2, y2)."""
    _check_boxes(boxes, "boxes")
    x1, y1, w, h = boxes.unbind(-1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (x1, y1, w, h)."""
    _check_boxes(boxes, "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    _check_boxes(boxes, "boxes")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    _check_boxes(boxes, "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def _as_float(boxes: torch.Tensor) -> torch.Tensor:
    # Integer pixel boxes are scored in float32; float boxes keep their dtype (and gradient).
    return boxes if boxes.is_floating_point() else boxes.float()


def _area(boxes: torch.Tensor) -> torch.Tensor:
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)  # (...)
    height = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)  # (...)
    return width * height


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0. The denominator is made 1 there before dividing, so the
    discarded branch of torch.where never holds a NaN that would poison the gradient."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(a[..., :2], b[..., :2])  # (..., 2)
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])  # (..., 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (..., 2), 0 where they do not overlap
    inter = wh[..., 0] * wh[..., 1]  # (...)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(...) IoU of each pair a[i], b[i] of xyxy boxes, in [0, 1]; 0 when the union is empty."""
    _check_pair(a, b)
    inter, union = _intersection_union(_as_float(a), _as_float(b))
    return _safe_ratio(inter, union)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(...) GIoU of each pair of xyxy boxes, in [-1, 1]: IoU - (C - union) / C, where C is the
    area of the smallest box enclosing both (the penalty is 0 when C itself is 0)."""
    _check_pair(a, b)
    a, b = _as_float(a), _as_float(b)
    inter, union = _intersection_union(a, b)
    iou = _safe_ratio(inter, union)
    enclosing = torch.cat(
        [torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], dim=-1
    )  # (..., 4)
    c = _area(enclosing)
    return iou - _safe_ratio(c - union, c)


def grounding_accuracy(
    pred_xyxy: torch.Tensor, gt_xyxy: torch.Tensor, threshold: float = 0.5
) -> float:
    """Fraction of predicted boxes whose IoU with their ground truth is >= threshold."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"IoU threshold must be in [0, 1], got {threshold}")
    iou = box_iou(pred_xyxy, gt_xyxy)
    if iou.numel() == 0:
        raise ValueError(f"no boxes to score: pred_xyxy has shape {tuple(pred_xyxy.shape)}")
    return (iou >= threshold).float().mean().item()


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(
            f"bins must be an integer >= 2 (image_size + 1 for mPLUG grounding), got {bins!r}"
        )


def quantize_box(cxcywh_normalised: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., 4) coordinates in [0, 1] -> (..., 4) long bins in [0, bins - 1]: round(v * (bins - 1)).

    Values outside [0, 1] (boxes cropped by augmentation) are clamped to the end bins. torch.round
    rounds halves to even, so a value exactly halfway between two bins may go either way; the
    round-trip error is at most 1 / (2 * (bins - 1)) either way.
    """
    _check_boxes(cxcywh_normalised, "cxcywh_normalised")
    _check_bins(bins)
    if not torch.isfinite(cxcywh_normalised).all():
        raise ValueError("cxcywh_normalised contains NaN or infinite coordinates")
    scaled = torch.round(cxcywh_normalised.double() * (bins - 1))
    return scaled.clamp(0, bins - 1).long()


def dequantize_box(tokens: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., 4) integer bins in [0, bins - 1] -> (..., 4) float coordinates in [0, 1]."""
    _check_boxes(tokens, "tokens")
    _check_bins(bins)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be an integer tensor of bin indices, got dtype {tokens.dtype}"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() > bins - 1):
        raise ValueError(
            f"bin indices must be in [0, {bins - 1}] for bins={bins}, got values from "
            f"{int(tokens.min())} to {int(tokens.max())}; subtract the first bin token's id first"
        )
    return tokens.float() / (bins - 1)
