"""Prefix language modelling (PrefixLM).

Each caption is split at a random point k in [1, n/2] of its n word pieces. The prefix ([CLS] and
the first k pieces) goes through the text encoder and the fusion module; the decoder generates the
rest (and [SEP]) attending to [v ; fused prefix].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.objectives.batch_draws import BatchDraws
from pretrain.objectives.distributed import token_share
from pretrain.objectives.mlm import IGNORE


@dataclass
class PrefixSplit:
    prefix_mask: torch.Tensor  # (B, L) 1 on [CLS] and the prefix pieces
    decoder_ids: torch.Tensor  # (B, L) [CLS] then the target pieces, padded
    decoder_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L) the next target piece at each decoder position, IGNORE after the end
    split: torch.Tensor  # (B,) k, the number of prefix pieces


def split_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    cls_id: int,
    pad_id: int,
    draws: BatchDraws | None = None,
) -> PrefixSplit:
    """Split each `[CLS] w1 .. wn [SEP]` caption at k in [1, max(1, n // 2)] (k = 0 when n = 0)."""
    batch, length = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(dim=1)  # (B,) [CLS] + n pieces + [SEP]
    pieces = (lengths - 2).clamp(min=0)
    upper = (pieces // 2).clamp(min=1)
    draw = (draws or BatchDraws()).rand((batch,), device)
    split = (1 + (draw * upper).long()).clamp(max=upper).minimum(pieces)  # (B,)
    positions = torch.arange(length, device=device)[None, :]  # (1, L)
    prefix_mask = ((positions <= split[:, None]) & attention_mask.bool()).long()

    # Decoder position p > 0 holds original token split + p; position 0 holds [CLS].
    target_len = lengths - split - 1  # (B,) remaining pieces + [SEP]
    source = (split[:, None] + positions).clamp(max=length - 1)  # (B, L)
    decoder_mask = (positions <= target_len[:, None]).long()
    decoder_ids = torch.where(decoder_mask.bool(), input_ids.gather(1, source), torch.full_like(input_ids, pad_id))
    decoder_ids[:, 0] = cls_id
    next_ids = torch.cat([decoder_ids[:, 1:], torch.full_like(decoder_ids[:, :1], pad_id)], dim=1)
    next_valid = torch.cat([decoder_mask[:, 1:], torch.zeros_like(decoder_mask[:, :1])], dim=1).bool()
    labels = torch.where(next_valid, next_ids, torch.full_like(input_ids, IGNORE))
    return PrefixSplit(prefix_mask, decoder_ids, decoder_mask, labels, split)


def prefix_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy of the decoder logits (B, L, V) against `labels` (B, L), averaged
    over the target tokens of the whole global batch (see `token_share`)."""
    share = token_share((labels != IGNORE).sum())
    if not bool(share > 0):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / share
