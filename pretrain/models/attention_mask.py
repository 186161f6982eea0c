"""Boolean attention masks in the (B, 1, Q, K) form scaled_dot_product_attention broadcasts."""

from __future__ import annotations

import torch


def padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) with 1 for real tokens -> (B, 1, 1, K) bool, True where attention is allowed."""
    return mask.bool()[:, None, None, :]


def causal_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) bool: each position sees itself, earlier real tokens."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return causal[None, None] & padding_mask(mask)
