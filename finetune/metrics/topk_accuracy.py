"""Top-k classification accuracy (action recognition's top-1 / top-5), in percent.

A sample is a hit at k when its label is among the k highest-scoring classes. Ties count against
the label, as in `retrieval_recall`: the rank of the label is the number of *other* classes scoring
at least as high, so a model giving every class the same score gets no hit at any k < C instead of
a lucky one. A k at or above the number of classes C is always a hit (every class is in the top k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5)


def label_ranks(scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """(N,) the rank of each sample's label (0 = first) among its C class scores (N, C), ties against it."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (N samples, C classes) with N, C >= 1, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    labels = torch.as_tensor(labels, device=scores.device)
    if labels.shape != scores.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be N={scores.shape[0]} integer class indices, got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    classes = scores.shape[1]
    outside = ((labels < 0) | (labels >= classes)).nonzero().flatten().tolist()
    if outside:
        raise ValueError(f"{len(outside)} labels lie outside [0, {classes}) for {classes} classes, e.g. sample "
                         f"{outside[0]} has label {int(labels[outside[0]])}")
    labels = labels.long()
    own = scores.gather(1, labels[:, None])  # (N, 1)
    return (scores >= own).sum(dim=1) - 1  # (N,) minus the label itself


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor | Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """`top{k}` for each k: the percentage of samples whose label ranks in the top k of scores (N, C)."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    ranks = label_ranks(scores, labels)
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
