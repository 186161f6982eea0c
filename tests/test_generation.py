"""Decoding for the downstream tasks: beam search, greedy, sampling, likelihoods, answer ranking.

Most tests use a bigram decoder, whose next-token distribution depends only on the last token, so
the best sequences can be worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from finetune.generation import (
    DecodeFn,
    beam_search,
    greedy,
    rank_answers,
    sample,
    sequence_log_likelihood,
)
from pretrain.models.factory import build_mplug

PAD, BOS, EOS, A, B, C = range(6)
VOCAB = 6
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


def table(rows: dict[int, dict[int, float]]) -> torch.Tensor:
    """(V, V) logits, row t = log p(next | last token t); a token without a row is followed uniformly."""
    probs = torch.full((VOCAB, VOCAB), 1.0 / VOCAB)
    for last, nexts in rows.items():
        probs[last] = 0.0
        for token, p in nexts.items():
            probs[last, token] = p
    return probs.log()


def bigram(*tables: torch.Tensor) -> DecodeFn:
    """A decoder whose logits depend only on the last token; input n reads tables[memory[n, 0, 0]]."""
    stacked = torch.stack(tables)  # (T, V, V)

    def decode(ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        which = memory[:, 0, 0].long()  # (N,)
        return stacked[which[:, None], ids]  # (N, L, V)

    return decode


def memory_for(*which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory (B, 1, 1) naming each input's bigram table, and its mask (B, 1)."""
    return torch.tensor(which, dtype=torch.float).view(-1, 1, 1), torch.ones(len(which), 1, dtype=torch.long)


# Greedy takes A (0.6) then EOS (0.4): p = 0.24. A beam of 2 also keeps B (0.4), and B EOS has
# p = 0.4 * 0.9 = 0.36. Both have length 2, so length normalisation does not change the order.
TRAP = table({BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.4, A: 0.3, B: 0.3}, B: {EOS: 0.9, A: 0.1}})
# EOS is the likeliest token everywhere.
EAGER = table({BOS: {EOS: 0.9, A: 0.1}, A: {EOS: 0.8, A: 0.2}})


def test_beam_search_finds_a_likelier_sequence_than_greedy():
    memory, mask = memory_for(0)
    assert greedy(bigram(TRAP), memory, mask, **IDS, max_length=5).tolist() == [[A]]
    out = beam_search(bigram(TRAP), memory, mask, **IDS, beams=2, max_length=5)
    assert out.sequences.tolist() == [[B]]
    assert out.scores.item() == pytest.approx(math.log(0.36) / 2)


def test_return_all_gives_every_beam_best_first():
    memory, mask = memory_for(0)
    out = beam_search(bigram(TRAP), memory, mask, **IDS, beams=2, max_length=5, return_all=True)
    assert out.all_sequences.tolist() == [[[B], [A]]]
    assert out.all_scores[0].tolist() == pytest.approx([math.log(0.36) / 2, math.log(0.24) / 2])


def test_beam_search_stops_once_every_beam_has_finished():
    calls = []
    decode = bigram(TRAP)

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return decode(*args)

    memory, mask = memory_for(0)
    beam_search(counting, memory, mask, **IDS, beams=2, max_length=25)
    # Step 1 ranks B EOS (0.36) and A EOS (0.24) first: both beams end, no third step runs.
    assert calls == [(2, 1), (2, 2)]


def test_each_input_decodes_against_its_own_memory():
    chain = table({BOS: {C: 1.0}, C: {A: 1.0}, A: {EOS: 1.0}})  # always "C A"
    memory, mask = memory_for(1, 0)
    out = beam_search(bigram(TRAP, chain), memory, mask, **IDS, beams=3, max_length=5)
    assert out.sequences.tolist() == [[C, A], [B, PAD]]
    assert out.scores.tolist() == pytest.approx([0.0, math.log(0.36) / 2])


def test_min_length_forbids_an_early_eos():
    memory, mask = memory_for(0)
    out = beam_search(bigram(EAGER), memory, mask, **IDS, beams=2, max_length=5)
    assert out.sequences.shape == (1, 0)  # the empty caption, p = 0.9
    assert out.scores.item() == pytest.approx(math.log(0.9))
    out = beam_search(bigram(EAGER), memory, mask, **IDS, beams=2, max_length=5, min_length=2)
    assert out.sequences.tolist() == [[A, A]]  # p = 0.1 * 0.2 * 0.8 over 3 tokens
    assert out.scores.item() == pytest.approx(math.log(0.1 * 0.2 * 0.8) / 3)


def test_allowed_ids_restrict_the_output():
    prefers_a = table({
        BOS: {A: 0.5, B: 0.3, C: 0.2},
        A: {A: 0.5, C: 0.3, EOS: 0.2},
        B: {A: 0.6, C: 0.3, EOS: 0.1},
        C: {A: 0.5, EOS: 0.3, B: 0.1, C: 0.1},
    })
    memory, mask = memory_for(0)
    assert greedy(bigram(prefers_a), memory, mask, **IDS, max_length=4).tolist() == [[A, A, A, A]]
    allowed = torch.tensor([B, C, EOS])
    # Without A: B (0.3) beats C (0.2), then C (0.3) beats EOS (0.1), then EOS (0.3).
    out = greedy(bigram(prefers_a), memory, mask, **IDS, max_length=4, allowed_ids=allowed)
    assert out.tolist() == [[B, C]]


def test_fixed_length_gives_exactly_n_tokens_and_never_ends():
    memory, mask = memory_for(0, 0)
    out = greedy(bigram(EAGER), memory, mask, **IDS, max_length=4, fixed_length=4)
    assert out.tolist() == [[A, A, A, A]] * 2


# First tokens: A 0.5 > B 0.3 > C 0.2. Whole answers: "A" 0.5 * 0.1 = 0.05, "B" 0.3 * 0.9 = 0.27,
# "C A" 0.2 * 0.5 * 0.1 = 0.01: the best answer does not start with the likeliest token.
RANKING = table({BOS: {A: 0.5, B: 0.3, C: 0.2}, A: {EOS: 0.1, A: 0.9}, B: {EOS: 0.9, A: 0.1}, C: {A: 0.5, EOS: 0.5}})
ANSWERS = torch.tensor([[BOS, A, EOS, PAD], [BOS, B, EOS, PAD], [BOS, C, A, EOS]])
ANSWER_MASK = (ANSWERS != PAD).long()


def test_rank_answers_picks_the_likeliest_answer_when_k_covers_it():
    memory, mask = memory_for(0)
    ranked = rank_answers(bigram(RANKING), memory, mask, ANSWERS, ANSWER_MASK, k=128, bos_id=BOS)
    assert ranked.best.tolist() == [1]
    assert ranked.candidates.tolist() == [[0, 1, 2]]  # k clipped to the 3 answers
    assert ranked.scores[0].tolist() == pytest.approx([math.log(0.05), math.log(0.27), math.log(0.01)])


def test_rank_answers_with_k_1_keeps_the_first_token_winner():
    memory, mask = memory_for(0)
    ranked = rank_answers(bigram(RANKING), memory, mask, ANSWERS, ANSWER_MASK, k=1, bos_id=BOS)
    assert ranked.best.tolist() == [0]


def test_rank_answers_refuses_answers_without_bos():
    memory, mask = memory_for(0)
    with pytest.raises(ValueError, match="must start with BOS"):
        rank_answers(bigram(RANKING), memory, mask, ANSWERS[:, 1:], ANSWER_MASK[:, 1:], bos_id=BOS)


def test_sequence_log_likelihood_skips_padding():
    memory, mask = memory_for(0, 0)
    scores = sequence_log_likelihood(bigram(RANKING), memory, mask, ANSWERS[:2], ANSWER_MASK[:2])
    assert scores.tolist() == pytest.approx([math.log(0.05), math.log(0.27)])


def test_sample_log_probs_are_the_model_likelihood_and_carry_grad():
    logits = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)).requires_grad_()
    memory, mask = memory_for(0, 0)
    out = sample(bigram(logits), memory, mask, **IDS, max_length=6, num_samples=4,
                 generator=torch.Generator().manual_seed(1))
    assert out.sequences.shape[0] == 8 and out.log_probs.shape == (8,)

    log_p = torch.log_softmax(logits.detach(), dim=-1)
    expected = []
    for row, row_mask in zip(out.sequences.tolist(), out.mask.tolist(), strict=True):
        tokens = [BOS] + [t for t, m in zip(row, row_mask, strict=True) if m]
        expected.append(sum(log_p[prev, nxt].item() for prev, nxt in zip(tokens[:-1], tokens[1:], strict=True)))
    assert out.log_probs.tolist() == pytest.approx(expected, abs=1e-5)

    out.log_probs.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_sampling_stops_each_sequence_at_its_eos():
    coin = table({BOS: {A: 0.5, EOS: 0.5}, A: {A: 0.5, EOS: 0.5}})
    memory, mask = memory_for(0)
    out = sample(bigram(coin), memory, mask, **IDS, max_length=8, num_samples=32,
                 generator=torch.Generator().manual_seed(0))
    lengths = out.mask.sum(dim=1)  # generated tokens, EOS included
    assert len(set(lengths.tolist())) > 2  # the samples really differ
    for row, length in zip(out.sequences.tolist(), lengths.tolist(), strict=True):
        ended = length < out.sequences.shape[1] or row[-1] == EOS
        expected = [A] * (length - 1) + [EOS] if ended else [A] * length
        assert row == expected + [PAD] * (len(row) - length)


def test_beam_search_on_the_tiny_decoder_ranks_beams_best_first(tiny_config):
    torch.manual_seed(0)
    text = tiny_config().model.text
    model = build_mplug(tiny_config().model, momentum=False).eval()
    memory = torch.randn(2, 5, text.width)
    memory_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = {"bos_id": text.cls_id, "eos_id": text.sep_id, "pad_id": text.pad_id}
    out = beam_search(model.decode, memory, memory_mask, **ids, beams=3, max_length=6, return_all=True)

    assert out.sequences.shape[0] == 2 and out.sequences.shape[1] <= 6
    assert out.all_sequences.shape[:2] == (2, 3) and out.all_scores.shape == (2, 3)
    assert torch.isfinite(out.all_scores).all()
    assert (out.all_scores[:, :-1] >= out.all_scores[:, 1:]).all()
    assert torch.equal(out.scores, out.all_scores[:, 0])
    assert torch.equal(out.sequences, out.all_sequences[:, 0, : out.sequences.shape[1]])

    # The best score is the decoder's own log-likelihood of [CLS] tokens ([SEP]) over its length.
    for b in range(2):
        tokens = [t for t in out.sequences[b].tolist() if t != text.pad_id]
        ended = len(tokens) < 6
        target = torch.tensor([[text.cls_id, *tokens] + ([text.sep_id] if ended else [])])
        likelihood = sequence_log_likelihood(model.decode, memory[b : b + 1], memory_mask[b : b + 1],
                                             target, torch.ones_like(target))
        assert likelihood.item() / (target.shape[1] - 1) == pytest.approx(out.scores[b].item(), abs=1e-5)
