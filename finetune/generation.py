"""Decoding for the downstream tasks: beam search (captioning, VQA), greedy decoding (grounding's
box tokens), sampling with differentiable log-probabilities (SCST), sequence log-likelihoods and
ALBEF/mPLUG's ranking over a closed answer list (VQA, video QA).

Every function takes a decode callable, `MPLUG.decode` or anything with its signature:

    decode(ids (N, T), mask (N, T), memory (N, M, D), memory_mask (N, M)) -> logits (N, T, V)

Sequences start from BOS ([CLS]) and end at EOS ([SEP]); pad fills what follows. The decoder keeps
no key/value cache, so every step re-runs the whole prefix: T steps cost O(T^2) token positions,
which at caption lengths (<= 25) is cheap next to the vision encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Generated:
    """Beam search output. Sequences hold the generated tokens without BOS, cut before EOS, padded."""

    sequences: torch.Tensor  # (B, L) the best hypothesis per input
    scores: torch.Tensor  # (B,) its sum of log-probs / length ** length_penalty
    all_sequences: torch.Tensor | None = None  # (B, beams, L') every beam, best first
    all_scores: torch.Tensor | None = None  # (B, beams) their scores, descending


@dataclass
class Sampled:
    """Sampled sequences without BOS, each keeping its EOS (when it drew one), then pad."""

    sequences: torch.Tensor  # (B * num_samples, L); row b * num_samples + i is sample i of input b
    mask: torch.Tensor  # (B * num_samples, L) 1 on generated tokens, EOS included
    log_probs: torch.Tensor  # (B * num_samples,) sum of log-probs of the generated tokens, with grad


@dataclass
class Ranked:
    """Answer ranking output: the winner per input and how its candidates scored."""

    best: torch.Tensor  # (B,) index into the answer list
    candidates: torch.Tensor  # (B, k) answer indices, by first-token probability, highest first
    scores: torch.Tensor  # (B, k) full-sequence log-likelihood of each candidate


def _check_memory(memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
    if memory.dim() != 3:
        raise ValueError(f"memory must be (B, M, D), got shape {tuple(memory.shape)}")
    if memory_mask.shape != memory.shape[:2]:
        raise ValueError(
            f"memory_mask must be (B, M) = {tuple(memory.shape[:2])} to match memory, "
            f"got {tuple(memory_mask.shape)}"
        )


def _next_log_probs(decode: DecodeFn, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
    """Log-probs (N, V) of the token after `ids` (N, T). No cache: the whole prefix runs again."""
    mask = torch.ones_like(ids)
    logits = decode(ids, mask, memory, memory_mask)[:, -1]  # (N, V)
    return F.log_softmax(logits.float(), dim=-1)


def _banned_tokens(vocab: int, *, pad_id: int, allowed_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(V,) bool, True for ids never generated: pad (it marks the end) and all ids outside `allowed_ids`."""
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    if allowed_ids is not None:
        if allowed_ids.dim() != 1 or allowed_ids.numel() == 0:
            raise ValueError(f"allowed_ids must be a non-empty 1-D tensor of token ids, got shape {tuple(allowed_ids.shape)}")
        if int(allowed_ids.min()) < 0 or int(allowed_ids.max()) >= vocab:
            raise ValueError(f"allowed_ids must lie in [0, {vocab}) for this vocabulary, got "
                             f"[{int(allowed_ids.min())}, {int(allowed_ids.max())}]")
        banned.fill_(True)
        banned[allowed_ids.to(device=device, dtype=torch.long)] = False
    banned[pad_id] = True
    return banned


def _trim_padding(tokens: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """(..., T) padded tokens -> (..., L) without the trailing columns that are pad in every row."""
    filled = (tokens != pad_id).flatten(0, -2).any(dim=0)  # (T,)
    width = int(filled.nonzero().max()) + 1 if filled.any() else 0
    return tokens[..., :width]


@torch.no_grad()
def beam_search(
    decode: DecodeFn,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beams: int = 5,
    max_length: int = 25,
    min_length: int = 0,
    length_penalty: float = 1.0,
    allowed_ids: torch.Tensor | None = None,
    return_all: bool = False,
) -> Generated:
    """Beam search keeping `beams` live hypotheses per input; `beams=1` is greedy decoding.

    Each step extends the live beams, ranks the candidates by summed log-prob and keeps the best
    `beams` that do not end; an EOS candidate ranked within the top `beams` moves, finished, into
    that input's pool of `beams` hypotheses, scored sum / length ** length_penalty (the length
    counts EOS) and never extended again. An input is done when its pool is full (Hugging Face's
    `early_stopping=True`); the search ends when every input is done or after `max_length`
    generated tokens (BOS excluded, EOS included), when the live beams of inputs not done join
    their pools unfinished. EOS is forbidden until `min_length` tokens precede it; pad is never
    generated. Scores are the model's log-probs: forbidden tokens are removed, not renormalised.
    """
    _check_memory(memory, memory_mask)
    if beams < 1:
        raise ValueError(f"beams must be >= 1 (1 is greedy), got {beams}")
    if max_length < 1 or not 0 <= min_length <= max_length:
        raise ValueError(f"need max_length >= 1 and 0 <= min_length <= max_length, got min_length={min_length}, "
                         f"max_length={max_length}")
    batch, device = memory.shape[0], memory.device
    memory = memory.repeat_interleave(beams, dim=0)  # (B*K, M, D): the K beams of an input are adjacent
    memory_mask = memory_mask.repeat_interleave(beams, dim=0)  # (B*K, M)
    offsets = torch.arange(batch, device=device)[:, None] * beams  # (B, 1) first row of each input
    neg_inf = float("-inf")

    ids = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1 + t)
    # All beams start as the same BOS: only the first may expand, or the K beams would be copies.
    live = torch.full((batch, beams), neg_inf, device=device)  # (B, K) summed log-probs
    live[:, 0] = 0.0
    pool_tokens = torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device)  # (B, K, T)
    pool_scores = torch.full((batch, beams), neg_inf, device=device)  # (B, K) normalised, descending
    pool_size = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    banned: torch.Tensor | None = None

    for step in range(max_length):
        # The decoder has no key/value cache: each step runs the whole prefix (B*K, 1 + t) again.
        log_probs = _next_log_probs(decode, ids, memory, memory_mask)  # (B*K, V)
        vocab = log_probs.shape[-1]
        if banned is None:
            banned = _banned_tokens(vocab, pad_id=pad_id, allowed_ids=allowed_ids, device=device)
        log_probs = log_probs.masked_fill(banned, neg_inf)
        if step < min_length:
            log_probs[:, eos_id] = neg_inf

        # 2K candidates hold at least K that do not end: each beam contributes at most one EOS.
        candidates = (live.view(-1, 1) + log_probs).view(batch, beams * vocab)  # (B, K*V)
        scores, flat = candidates.topk(min(2 * beams, beams * vocab), dim=-1)  # (B, C), descending
        rows = (flat // vocab + offsets).view(-1)  # (B*C,) the beam each candidate extends
        tokens = flat % vocab  # (B, C)
        ends = (tokens == eos_id) & scores.isfinite()

        # Finished: EOS candidates ranked within the top K, for inputs whose pool is still open.
        rank = torch.arange(scores.shape[1], device=device)
        finishing = ends & (rank < beams) & ~done[:, None]  # (B, C)
        prefixes = ids[rows, 1:].view(batch, scores.shape[1], step)  # (B, C, t) tokens before the EOS
        new_tokens = F.pad(prefixes, (0, max_length - step), value=pad_id)  # (B, C, T)
        new_scores = torch.where(finishing, scores / float(step + 1) ** length_penalty, neg_inf)
        pool_scores, pool_tokens = _merge_pool(pool_scores, pool_tokens, new_scores, new_tokens)
        pool_size = (pool_size + finishing.sum(dim=1)).clamp(max=beams)

        # Live: the best K candidates that do not end, in rank order (a stable sort puts EOS last).
        keep = ends.long().argsort(dim=1, stable=True)[:, :beams]  # (B, K)
        live = scores.gather(1, keep).masked_fill(ends.gather(1, keep), neg_inf)
        kept_rows = rows.view(batch, -1).gather(1, keep).view(-1)  # (B*K,)
        ids = torch.cat([ids[kept_rows], tokens.gather(1, keep).view(-1, 1)], dim=1)  # (B*K, 2 + t)

        done |= (pool_size >= beams) | ~live.isfinite().any(dim=1)
        if done.all():
            break
    else:  # max_length reached: unfinished live beams of open inputs compete with their pools
        live_scores = torch.where(done[:, None], neg_inf, live / float(max_length) ** length_penalty)
        pool_scores, pool_tokens = _merge_pool(pool_scores, pool_tokens, live_scores, ids[:, 1:].view(batch, beams, -1))

    best = _trim_padding(pool_tokens[:, 0], pad_id=pad_id)  # (B, L)
    if not return_all:
        return Generated(best, pool_scores[:, 0])
    return Generated(best, pool_scores[:, 0], _trim_padding(pool_tokens, pad_id=pad_id), pool_scores)


def _merge_pool(
    scores: torch.Tensor, tokens: torch.Tensor, new_scores: torch.Tensor, new_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the best K of a pool (B, K) / (B, K, T) and new hypotheses (B, C) / (B, C, T), best first."""
    beams = scores.shape[1]
    all_scores = torch.cat([scores, new_scores], dim=1)  # (B, K + C)
    all_tokens = torch.cat([tokens, new_tokens], dim=1)  # (B, K + C, T)
    # A stable sort keeps pool entries ahead of equally scored newcomers.
    order = all_scores.argsort(dim=1, descending=True, stable=True)[:, :beams]  # (B, K)
    return all_scores.gather(1, order), all_tokens.gather(1, order[:, :, None].expand(-1, -1, all_tokens.shape[2]))


@torch.no_grad()
def greedy(
    decode: DecodeFn,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    allowed_ids: torch.Tensor | None = None,
    fixed_length: int | None = None,
) -> torch.Tensor:
    """Argmax decoding -> (B, L) tokens without BOS, cut before EOS, padded with pad_id.

    With `fixed_length` exactly that many tokens are generated and EOS is never chosen (grounding
    emits 4 box tokens); it must not exceed `max_length`.
    """
    if fixed_length is not None and not 1 <= fixed_length <= max_length:
        raise ValueError(f"fixed_length must be in [1, max_length={max_length}], got {fixed_length}")
    length = max_length if fixed_length is None else fixed_length
    out = beam_search(
        decode, memory, memory_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, beams=1,
        max_length=length, min_length=fixed_length or 0, allowed_ids=allowed_ids,
    )
    return out.sequences


def sample(
    decode: DecodeFn,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Draw `num_samples` sequences per input; their log-probs carry the gradient (for SCST).

    This function runs WITH grad, unlike the others. Tokens are drawn under no_grad from
    softmax(logits / temperature) (pad excluded), each sequence stopping at its EOS; then one
    teacher-forced decoder pass over the drawn sequences computes `log_probs` under the model
    itself (temperature 1) with the autograd graph, which costs one forward instead of keeping
    `max_length` graphs alive. In train mode dropout differs between the two passes.
    """
    _check_memory(memory, memory_mask)
    if num_samples < 1 or max_length < 1:
        raise ValueError(f"num_samples and max_length must be >= 1, got {num_samples} and {max_length}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy() for argmax decoding), got {temperature}")
    memory = memory.repeat_interleave(num_samples, dim=0)  # (B*S, M, D)
    memory_mask = memory_mask.repeat_interleave(num_samples, dim=0)  # (B*S, M)
    rows, device = memory.shape[0], memory.device

    ids = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)  # (B*S, 1)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    banned: torch.Tensor | None = None
    with torch.no_grad():
        for _ in range(max_length):
            logits = decode(ids, torch.ones_like(ids), memory, memory_mask)[:, -1].float()  # (B*S, V)
            if banned is None:
                banned = _banned_tokens(logits.shape[-1], pad_id=pad_id, allowed_ids=None, device=device)
            logits = logits.masked_fill(banned, float("-inf"))
            drawn = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)  # (B*S, 1)
            drawn = drawn.masked_fill(finished[:, None], pad_id)
            ids = torch.cat([ids, drawn], dim=1)
            finished |= drawn[:, 0] == eos_id
            if finished.all():
                break

    target_mask = torch.ones_like(ids)  # (B*S, 1 + L): BOS and every token up to its EOS
    target_mask[:, 1:] = (ids[:, 1:] != pad_id).long()
    log_probs = sequence_log_likelihood(decode, memory, memory_mask, ids, target_mask)
    return Sampled(ids[:, 1:], target_mask[:, 1:], log_probs)


def sequence_log_likelihood(
    decode: DecodeFn,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum over t >= 1 of log p(target_ids[:, t] | target_ids[:, :t], memory) where target_mask is 1.

    target_ids (B, L) start with BOS; returns (B,), with grad.
    """
    _check_memory(memory, memory_mask)
    if target_ids.dim() != 2 or target_ids.shape != target_mask.shape or target_ids.shape[0] != memory.shape[0]:
        raise ValueError(
            f"target_ids and target_mask must both be (B, L) with B = {memory.shape[0]} (memory's batch), "
            f"got {tuple(target_ids.shape)} and {tuple(target_mask.shape)}"
        )
    logits = decode(target_ids, target_mask, memory, memory_mask)  # (B, L, V)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V) predicts position t+1
    token = log_probs.gather(-1, target_ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    # where, not multiply: a masked position may hold -inf (pad), and -inf * 0 is nan.
    token = torch.where(target_mask[:, 1:].bool(), token, torch.zeros_like(token))
    return token.sum(dim=-1)


@torch.no_grad()
def rank_answers(
    decode: DecodeFn,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    *,
    k: int = 128,
    bos_id: int,
) -> Ranked:
    """ALBEF/mPLUG answer ranking over a closed list of A answers.

    One decoder step from BOS gives each input's first-token distribution; the k answers whose
    first token is most probable are scored by their full log-likelihood (EOS included) and the
    best is returned. answer_ids (A, L) are `BOS a1 .. an EOS pad..`; k is clipped to A.
    """
    _check_memory(memory, memory_mask)
    if answer_ids.dim() != 2 or answer_ids.shape != answer_mask.shape or answer_ids.shape[1] < 2:
        raise ValueError(f"answer_ids and answer_mask must both be (A, L) with L >= 2, got "
                         f"{tuple(answer_ids.shape)} and {tuple(answer_mask.shape)}")
    if not bool((answer_ids[:, 0] == bos_id).all()):
        raise ValueError(f"every answer must start with BOS (id {bos_id}); first tokens seen: "
                         f"{sorted(set(answer_ids[:, 0].tolist()))}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch, answers = memory.shape[0], answer_ids.shape[0]
    k = min(k, answers)
    answer_ids, answer_mask = answer_ids.to(memory.device), answer_mask.to(memory.device)

    start = torch.full((batch, 1), bos_id, dtype=torch.long, device=memory.device)  # (B, 1)
    first = _next_log_probs(decode, start, memory, memory_mask)  # (B, V)
    first_of_answer = first[:, answer_ids[:, 1]]  # (B, A) log-prob of each answer's first token
    candidates = first_of_answer.topk(k, dim=-1).indices  # (B, k)

    flat = candidates.view(-1)  # (B*k,)
    scores = sequence_log_likelihood(
        decode,
        memory.repeat_interleave(k, dim=0),  # (B*k, M, D)
        memory_mask.repeat_interleave(k, dim=0),
        answer_ids[flat],  # (B*k, L)
        answer_mask[flat],
    ).view(batch, k)
    best = candidates.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)  # (B,)
    return Ranked(best, candidates, scores)
