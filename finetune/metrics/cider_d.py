"""CIDEr-D in pure Python, for the self-critical (SCST) caption reward.

SCST scores thousands of sampled captions per step against one fixed training corpus, so the
document frequencies are computed once, from the training references ("corpus mode"), and
reused for every call; no Java and no subprocess is involved.

The metric is the CIDEr-D of Vedantam et al. as SCST papers use it:

- each caption becomes, for every n-gram order 1..n, a vector of tf-idf weights
  `count(g) * (log(#reference sets) - log(max(1, df(g))))`, where df(g) is the number of
  reference sets (images) of the corpus with g in any of their captions;
- per order, the candidate is compared with each reference by a cosine whose numerator clips
  the candidate's weights at the reference's (`min(c_g, r_g) * r_g`), so repeating a matching
  word earns nothing;
- each cosine is multiplied by the Gaussian length penalty `exp(-(len_c - len_r)^2 / (2 sigma^2))`;
- the score is 10 x the mean over orders, averaged over the references.

Tokenisation is the simple one the Karpathy-split captions were made with: lowercase, delete
ASCII punctuation, split on whitespace. Evaluation (`caption_scores`) uses the PTB tokenizer
instead, which splits "dog's" into "dog 's" and keeps hyphenated words, so absolute values
differ slightly from PTB-tokenised CIDEr-D. With the same tokens and the corpus equal to the
evaluated references, the scores equal pycocoevalcap's `Cider` (which is CIDEr-D too).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NGram = tuple[str, ...]

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SCALE = 10.0  # CIDEr-D's convention: a perfect match against identical references scores 10


def tokenize(caption: str) -> list[str]:
    """Lowercase, delete ASCII punctuation, split on whitespace: "A dog's toy." -> [a, dogs, toy]."""
    return caption.lower().translate(_DELETE_PUNCTUATION).split()


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[NGram]:
    """Counts of every n-gram of orders 1..n in `tokens`."""
    counts: Counter[NGram] = Counter()
    for order in range(1, n + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


@dataclass(frozen=True)
class _TfIdf:
    """One caption's tf-idf weights per n-gram order, their norms, and its length in words."""

    weights: list[dict[NGram, float]]  # index k holds the (k+1)-grams
    norms: list[float]
    length: int


class CiderD:
    """CIDEr-D with document frequencies fixed from a reference corpus.

    `reference_corpus` yields one reference set (the captions of one image) at a time, e.g. every
    training image's captions. Scores are on the CIDEr-D scale (pycocoevalcap's: papers report
    100 x this value).
    """

    def __init__(
        self, reference_corpus: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0
    ) -> None:
        if n < 1:
            raise ValueError(f"n is the largest n-gram order and must be at least 1, got {n}")
        if not sigma > 0:
            raise ValueError(
                f"sigma is the length penalty's standard deviation and must be positive, got {sigma}"
            )
        self.n = n
        self.sigma = sigma
        document_frequency: Counter[NGram] = Counter()
        num_sets = 0
        for index, references in enumerate(reference_corpus):
            _check_reference_set(references, f"reference set {index} of the corpus")
            # df counts reference sets, not captions: an n-gram said by all five annotators of
            # one image counts once
            present: set[NGram] = set()
            for reference in references:
                present.update(ngram_counts(tokenize(reference), n))
            document_frequency.update(present)
            num_sets += 1
        if num_sets == 0:
            raise ValueError(
                "reference_corpus is empty; CIDEr-D needs the reference sets of at least one image"
            )
        self.document_frequency: dict[NGram, int] = dict(document_frequency)
        self.log_num_sets = math.log(num_sets)

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its reference set, shape (len(candidates),).

        `references[i]` is the reference set of `candidates[i]`; several candidates may share one
        (several sampled captions of one image), and its tf-idf vectors are then built once.
        """
        if isinstance(candidates, str) or isinstance(references, str):
            raise TypeError(
                "candidates and references must be sequences of captions, not a single str"
            )
        if len(candidates) != len(references):
            raise ValueError(
                f"got {len(candidates)} candidates but {len(references)} reference sets; "
                "references[i] must be the reference set of candidates[i]"
            )
        reference_vectors: dict[tuple[str, ...], list[_TfIdf]] = {}
        scores = np.zeros(len(candidates), dtype=np.float64)
        for index, (candidate, reference_set) in enumerate(
            zip(candidates, references, strict=True)
        ):
            if not isinstance(candidate, str):
                raise TypeError(
                    f"candidate {index} is a {type(candidate).__name__} ({candidate!r}); expected a str"
                )
            _check_reference_set(reference_set, f"reference set of candidate {index}")
            key = tuple(reference_set)
            if key not in reference_vectors:
                reference_vectors[key] = [self._tfidf(reference) for reference in key]
            vector = self._tfidf(candidate)
            total = sum(self._similarity(vector, reference) for reference in reference_vectors[key])
            scores[index] = _SCALE * total / len(key)
        return scores

    def _tfidf(self, caption: str) -> _TfIdf:
        tokens = tokenize(caption)
        weights: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        for gram, count in ngram_counts(tokens, self.n).items():
            # an n-gram absent from the corpus gets df 1, the largest idf: log(#sets)
            idf = self.log_num_sets - math.log(max(1, self.document_frequency.get(gram, 0)))
            weights[len(gram) - 1][gram] = count * idf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        return _TfIdf(weights, norms, len(tokens))

    def _similarity(self, candidate: _TfIdf, reference: _TfIdf) -> float:
        """Mean over n-gram orders of the clipped, length-penalised cosine."""
        penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for cand, ref, cand_norm, ref_norm in zip(
            candidate.weights, reference.weights, candidate.norms, reference.norms, strict=True
        ):
            if cand_norm == 0 or ref_norm == 0:
                continue  # no weighted n-gram of this order on one side: the cosine is 0
            dot = sum(
                min(weight, ref.get(gram, 0.0)) * ref.get(gram, 0.0)
                for gram, weight in cand.items()
            )
            total += dot / (cand_norm * ref_norm) * penalty
        return total / self.n


def _check_reference_set(references: Sequence[str], where: str) -> None:
    if isinstance(references, str):
        raise TypeError(
            f"{where} is a single str ({references!r}); expected a sequence of reference captions"
        )
    if len(references) == 0:
        raise ValueError(f"{where} is empty; every image needs at least one reference caption")
    for reference in references:
        if not isinstance(reference, str):
            raise TypeError(
                f"{where} holds a {type(reference).__name__} ({reference!r}); expected str captions"
            )
