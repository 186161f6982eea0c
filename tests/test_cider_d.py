"""CIDEr-D for the SCST reward: ordering, clipping, length penalty, a hand-worked value, pycocoevalcap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from finetune.metrics.cider_d import CiderD, tokenize

# Four images; "a" and "on" are in every set, so their idf is 0, the rest are rarer.
CORPUS = [
    ["a black cat sleeps on a red sofa", "a cat lying on a sofa", "a dark cat asleep on the couch"],
    ["a man rides a horse on the beach", "a person riding a brown horse on sand"],
    ["two dogs play with a ball on the grass", "a pair of dogs chasing a ball on a lawn"],
    ["a plate of pasta on a wooden table", "a bowl of spaghetti on a table"],
]
NO_PENALTY = 1e9  # a sigma so large that the length penalty is 1 to machine precision


def test_tokenize_lowercases_deletes_punctuation_and_splits_on_whitespace():
    assert tokenize("A dog's  toy,\tred.\n") == ["a", "dogs", "toy", "red"]


def test_identical_beats_partial_beats_unrelated_which_scores_exactly_zero():
    cider = CiderD(CORPUS)
    references = CORPUS[0]
    identical, partial, unrelated = cider.score(
        [
            "a black cat sleeps on a red sofa",
            "a black cat on a chair",
            "two horses run across a field",
        ],
        [references] * 3,
    )
    assert identical > partial > unrelated
    assert unrelated == 0.0  # "a" is its only shared n-gram and its idf is 0


def test_padding_with_repeated_words_is_lowered_by_the_length_penalty():
    references = [CORPUS[1]]
    exact = "a man rides a horse on the beach"  # 8 words, as are both references
    padded = exact + " beach beach beach beach"  # 12 words
    with_penalty = CiderD(CORPUS).score([exact, padded], references * 2)
    without_penalty = CiderD(CORPUS, sigma=NO_PENALTY).score([padded], references)
    assert with_penalty[1] < with_penalty[0]
    # 4 words longer than each reference: every term is scaled by exp(-4^2 / (2 * 6^2)).
    assert with_penalty[1] == pytest.approx(math.exp(-16 / 72) * without_penalty[0], rel=1e-12)


def test_clipping_makes_a_repeated_matching_word_worth_no_more_than_once():
    cider = CiderD(CORPUS, n=1, sigma=NO_PENALTY)
    once, four_times = cider.score(["cat", "cat cat cat cat"], [["a cat"], ["a cat"]])
    assert once > 0
    # The numerator clips the candidate's weight 4w to the reference's w, while the candidate's
    # norm grows to 4w: without clipping the two would score the same, with it exactly 1/4.
    assert four_times == pytest.approx(once / 4, rel=1e-12)


def test_unigram_value_worked_by_hand():
    # Corpus of two images, n=1: N = 2, so idf(g) = log 2 - log df(g).
    #   df: a=2 (idf 0), cat=1, black=1, dog=1 (idf log 2 = l).
    # Candidate "a black cat": vector {a: 0, black: l, cat: l}, norm l*sqrt(2), 3 words.
    #   vs "a cat" ({a: 0, cat: l}, norm l, 2 words): clipped dot = l*l (black is absent),
    #     cosine = l^2 / (l*sqrt(2) * l) = 1/sqrt(2), length penalty exp(-1/72).
    #   vs "a black cat": identical, cosine 1, penalty 1.
    # CIDEr-D = 10 * (exp(-1/72)/sqrt(2) + 1) / 2 = 5 * (0.986207117 * 0.707106781 + 1) = 8.486768700
    cider = CiderD([["a cat", "a black cat"], ["a dog"]], n=1)
    (value,) = cider.score(["a black cat"], [["a cat", "a black cat"]])
    assert value == pytest.approx(8.486768700, abs=1e-6)


def test_references_shared_by_several_candidates_score_as_if_given_separately():
    cider = CiderD(CORPUS)
    samples = ["a cat on a sofa", "a black cat sleeping", "a sofa"]
    shared = cider.score(samples, [CORPUS[0]] * 3)
    separate = np.array([cider.score([s], [list(CORPUS[0])])[0] for s in samples])
    np.testing.assert_array_equal(shared, separate)


def test_equals_pycocoevalcap_cider_when_the_corpus_is_the_evaluated_references():
    # pycocoevalcap's Cider already has CIDEr-D's clipping, sigma=6 penalty and x10 scale; it takes
    # its document frequencies from the evaluated references. Given the same tokens and that
    # same corpus, the two agree.
    candidates = [
        "a cat sleeping on a red couch",
        "a man riding a horse",
        "dogs playing with a ball",
        "a plate of food on a table",
    ]
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(CORPUS)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(candidates)}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD(CORPUS).score(candidates, CORPUS)
    np.testing.assert_allclose(ours, per_image, rtol=1e-9, atol=1e-12)
    assert ours.mean() == pytest.approx(mean, rel=1e-9)


def test_score_rejects_mismatched_lengths_and_empty_reference_sets():
    cider = CiderD(CORPUS)
    with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
        cider.score(["a cat", "a dog"], [CORPUS[0]])
    with pytest.raises(ValueError, match="reference set of candidate 0 is empty"):
        cider.score(["a cat"], [[]])
    with pytest.raises(TypeError, match="reference set of candidate 0 is a single str"):
        cider.score(["a cat"], ["a cat on a sofa"])


def test_corpus_must_hold_at_least_one_reference_set():
    with pytest.raises(ValueError, match="reference_corpus is empty"):
        CiderD([])
    with pytest.raises(ValueError, match="reference set 1 of the corpus is empty"):
        CiderD([["a cat"], []])
