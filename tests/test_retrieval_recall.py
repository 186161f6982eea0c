"""Recall at K for image-text retrieval: ranks with several texts per image, ties, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.metrics.retrieval_recall import random_recall_at_1, retrieval_recall

# 3 images with 2 texts each: texts 0, 1 -> image 0; 2, 3 -> image 1; 4, 5 -> image 2.
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]
SIM = torch.tensor(
    [  # t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # image 0
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],  # image 1
        [0.1, 0.2, 0.3, 0.9, 0.8, 0.0],  # image 2
    ]
)
# Image -> text, rank of the best own text (0 = first):
#   image 0: best own t0 = 0.9, no negative above           -> rank 0
#   image 1: best own t2 = 0.5, negatives t0 0.7, t1 0.6     -> rank 2
#   image 2: best own t4 = 0.8, negative t3 0.9              -> rank 1
# Text -> image, rank of the own image in each column:
#   t0: 0.9 vs 0.7, 0.1 -> 0    t1: 0.1 vs 0.6, 0.2 -> 2    t2: 0.5 vs 0.8, 0.3 -> 1
#   t3: 0.1 vs 0.2, 0.9 -> 2    t4: 0.8 vs 0.3, 0.2 -> 0    t5: 0.0 vs 0.4, 0.3 -> 2
EXPECTED_K123 = {
    "txt_r1": 100 / 3,  # ranks [0, 2, 1]: 1 of 3 below 1
    "txt_r2": 200 / 3,  # 2 of 3 below 2
    "txt_r3": 100.0,
    "txt_r_mean": 200 / 3,  # (33.3 + 66.7 + 100) / 3
    "img_r1": 100 / 3,  # ranks [0, 2, 1, 2, 0, 2]: 2 of 6 below 1
    "img_r2": 50.0,  # 3 of 6 below 2
    "img_r3": 100.0,
    "img_r_mean": 550 / 9,  # (33.3 + 50 + 100) / 3
    "r_mean": (200 / 3 + 550 / 9) / 2,
}


def test_recall_at_k_with_two_texts_per_image():
    assert retrieval_recall(SIM, TEXT_TO_IMAGE, ks=(1, 2, 3)) == pytest.approx(EXPECTED_K123)


def test_numpy_scores_give_the_same_recall_as_torch():
    assert retrieval_recall(SIM.numpy(), np.array(TEXT_TO_IMAGE), ks=(1, 2, 3)) == pytest.approx(
        EXPECTED_K123
    )


def test_an_image_counts_its_best_ranked_text_only():
    # image 0's texts score 0.9 (first) and 0.1 (last of all): still a hit at R@1
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    result = retrieval_recall(sim, [0, 0, 1], ks=(1,))
    assert result["txt_r1"] == 100.0  # image 1: own t2 0.8 is its top score too


def test_default_keys_are_those_of_albef_itm_eval():
    result = retrieval_recall(torch.eye(3), [0, 1, 2])
    assert set(result) == {
        "txt_r1", "txt_r5", "txt_r10", "txt_r_mean",
        "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
    }  # fmt: skip
    assert all(v == 100.0 for v in result.values())  # the identity ranks every positive first


def test_a_positive_tied_with_a_negative_ranks_behind_it():
    # all scores equal: each positive is tied with one negative -> rank 1, a miss at R@1
    result = retrieval_recall(torch.ones(2, 2), [0, 1], ks=(1, 2))
    assert result["txt_r1"] == 0.0 and result["img_r1"] == 0.0
    assert result["txt_r2"] == 100.0 and result["img_r2"] == 100.0


def test_tie_in_one_column_only_affects_that_text():
    # t0: own image 0 scores 1.0, image 1 also 1.0 -> rank 1; t1: own 1.0 vs 0.0 -> rank 0
    sim = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert retrieval_recall(sim, [0, 1], ks=(1,))["img_r1"] == 50.0


def test_integer_scores_are_accepted():
    assert retrieval_recall(torch.eye(2, dtype=torch.long), [0, 1], ks=(1,))["r_mean"] == 100.0


def test_scores_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"must be 2-D .* got shape \(6,\)"):
        retrieval_recall(torch.ones(6), TEXT_TO_IMAGE)


def test_text_to_image_must_have_one_entry_per_text_column():
    with pytest.raises(ValueError, match="5 entries but sim has 6 text columns"):
        retrieval_recall(SIM, TEXT_TO_IMAGE[:5])


def test_image_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"outside \[0, 3\) .* text 5 -> 3"):
        retrieval_recall(SIM, [0, 0, 1, 1, 2, 3])


def test_an_image_without_texts_is_an_error():
    with pytest.raises(ValueError, match="1 of 3 images have no text .* image 2"):
        retrieval_recall(SIM, [0, 0, 1, 1, 1, 1])


def test_nan_scores_are_an_error():
    sim = SIM.clone()
    sim[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(sim, TEXT_TO_IMAGE)


def test_ks_must_be_positive_integers():
    with pytest.raises(ValueError, match="positive integers, got \\(0, 5\\)"):
        retrieval_recall(SIM, TEXT_TO_IMAGE, ks=(0, 5))


def test_random_recall_at_1_is_one_over_the_number_of_images():
    # COCO-like: 4 images x 5 texts. Image -> text: each image has 5 of 20 texts -> 25%;
    # text -> image: 1 of 4 images -> 25%.
    result = random_recall_at_1(4, [i for i in range(4) for _ in range(5)])
    assert result == pytest.approx({"txt_r1": 25.0, "img_r1": 25.0, "r_mean": 25.0})


def test_random_recall_with_uneven_texts_per_image():
    # image 0 has 3 of 4 texts, image 1 has 1: (3/4 + 1/4) / 2 = 50%; text -> image: 1/2 = 50%
    assert random_recall_at_1(2, [0, 0, 0, 1]) == pytest.approx(
        {"txt_r1": 50.0, "img_r1": 50.0, "r_mean": 50.0}
    )


def test_random_recall_needs_a_text_for_every_image():
    with pytest.raises(ValueError, match="image 2"):
        random_recall_at_1(3, [0, 1])
