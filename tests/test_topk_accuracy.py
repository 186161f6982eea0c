"""Top-k accuracy: ranks on hand-built scores, ties against the label, k beyond the classes, validation."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.topk_accuracy import label_ranks, topk_accuracy

# 4 samples over 6 classes; the label's rank (0 = first) is written beside each row.
SCORES = torch.tensor([
    [0.9, 0.1, 0.2, 0.3, 0.0, 0.4],  # label 0: the best score            -> rank 0
    [0.5, 0.1, 0.6, 0.7, 0.2, 0.3],  # label 0: 0.6 and 0.7 score higher  -> rank 2
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: the lowest of all         -> rank 5
    [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 5: four classes above it     -> rank 4
])
LABELS = [0, 0, 0, 5]


def test_ranks_count_the_classes_scoring_above_the_label():
    assert label_ranks(SCORES, LABELS).tolist() == [0, 2, 5, 4]


def test_top1_and_top5_on_hand_built_scores():
    # ranks [0, 2, 5, 4]: 1 of 4 below 1, 2 of 4 below 3, 3 of 4 below 5 (rank 4 is the fifth place)
    assert topk_accuracy(SCORES, LABELS, ks=(1, 3, 5)) == pytest.approx({"top1": 25.0, "top3": 50.0, "top5": 75.0})


def test_a_label_tied_with_another_class_ranks_behind_it():
    scores = torch.tensor([[0.5, 0.5, 0.1], [1.0, 1.0, 1.0]])
    assert label_ranks(scores, [0, 2]).tolist() == [1, 2]
    assert topk_accuracy(scores, [0, 2], ks=(1, 2, 3)) == pytest.approx({"top1": 0.0, "top2": 50.0, "top3": 100.0})


def test_k_beyond_the_number_of_classes_is_always_a_hit():
    scores = torch.tensor([[0.1, 0.9], [0.9, 0.1]])  # 2 classes, both labels ranked last
    assert topk_accuracy(scores, [0, 1], ks=(1, 5)) == {"top1": 0.0, "top5": 100.0}


@pytest.mark.parametrize("scores, labels, complaint", [
    (torch.zeros(3), [0, 1, 2], r"\(N samples, C classes\)"),
    (torch.zeros(2, 3), [0, 3], r"outside \[0, 3\) for 3 classes, e.g. sample 1 has label 3"),
    (torch.zeros(2, 3), [0.0, 1.0], "integer class indices"),
    (torch.zeros(2, 3), [0], "N=2 integer class indices"),
    (torch.tensor([[float("nan"), 0.0]]), [0], "NaN"),
])
def test_malformed_inputs_are_errors_saying_what_is_expected(scores, labels, complaint):
    with pytest.raises(ValueError, match=complaint):
        topk_accuracy(scores, labels)


def test_k_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="positive integers"):
        topk_accuracy(SCORES, LABELS, ks=(0,))
