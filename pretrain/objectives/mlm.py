"""Masked language modelling (MLM) through the fusion module, with momentum soft labels.

15% of the non-special tokens are chosen; of those 80% become [MASK], 10% a random token and 10%
stay as they are. The text encoder reads the masked caption, the fusion module joins it with the
image, and the MLM head predicts the chosen tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.objectives.batch_draws import BatchDraws
from pretrain.objectives.distributed import token_share

IGNORE = -100  # label of the positions that carry no loss


@dataclass
class MaskedTokens:
    input_ids: torch.Tensor  # (B, L) with the chosen tokens replaced
    labels: torch.Tensor  # (B, L) original id at chosen positions, IGNORE elsewhere


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    draws: BatchDraws | None = None,
) -> MaskedTokens:
    if not 0 <= mask_ratio + random_ratio <= 1:
        raise ValueError(f"mask_ratio + random_ratio must lie in [0, 1], got {mask_ratio} + {random_ratio}")
    device = input_ids.device
    draws = draws or BatchDraws()

    def uniform() -> torch.Tensor:
        return draws.rand(tuple(input_ids.shape), device)

    special = torch.isin(input_ids, torch.tensor(sorted(set(special_ids)), device=device))
    chosen = (uniform() < probability) & ~special
    action = uniform()  # one draw decides between [MASK], random and kept
    to_mask = chosen & (action < mask_ratio)
    to_random = chosen & (action >= mask_ratio) & (action < mask_ratio + random_ratio)
    random_tokens = draws.randint(vocab_size, tuple(input_ids.shape), device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_tokens, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return MaskedTokens(input_ids=masked, labels=labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_logits: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Cross-entropy on the chosen tokens, mixed with the momentum model's soft labels by `alpha`.

    logits, soft_logits: (B, L, V); labels: (B, L). The mean runs over the chosen tokens of the whole
    global batch (see `token_share`); a global batch with no chosen token gives a zero loss.
    """
    chosen = labels != IGNORE
    share = token_share(chosen.sum())  # a collective: before any early return
    if not bool(share > 0):
        return logits.sum() * 0.0  # keeps the graph connected for every rank
    log_probs = F.log_softmax(logits[chosen].float(), dim=-1)  # (K, V)
    loss = F.nll_loss(log_probs, labels[chosen], reduction="sum") / share
    if soft_logits is not None and alpha > 0:
        soft = F.softmax(soft_logits[chosen].float(), dim=-1)
        distill = -(soft * log_probs).sum() / share
        loss = (1 - alpha) * loss + alpha * distill
    return loss
