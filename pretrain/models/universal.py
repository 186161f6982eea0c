"""mPLUG-2's universal layers: the last text-encoder layers, shared with the vision side.

A few learnable latent queries read the visual tokens; between reads they pass through the text
encoder's own last layers (self-attention and FFN), so vision and language meet in shared weights.
The visual tokens then read the latents back, keeping their sequence length:

    q = latents                                                        (B, L, D)
    for each shared text layer k:  q = LN(q + CrossAttn_k(q, v))        a new cross-attention per layer
                                   q = text_layer_k(q)                  the text encoder's layer
    out = LN(v + CrossAttn_back(v, q))                                  (B, Lv, D)

The text layers are passed in at every call and never registered here, so each shared tensor has
one name (under `text_encoder.`), is counted once and is updated once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertAttention

from pretrain.config.schema import TextConfig, UniversalConfig
from pretrain.models.text import INIT_STD, bert_config, init_bert_weights, run_layer


class UniversalLayers(nn.Module):
    """Visual states (B, Lv, D) -> (B, Lv, D), through latents and the shared text layers."""

    def __init__(self, text: TextConfig, cfg: UniversalConfig):
        super().__init__()
        if cfg.latents < 1:
            raise ValueError(f"universal layers need at least one latent query, got universal.latents={cfg.latents}")
        config = bert_config(text)
        self.latents = nn.Parameter(torch.empty(cfg.latents, text.width))
        self.cross = nn.ModuleList(BertAttention(config, is_cross_attention=True) for _ in range(cfg.layers))
        self.back = BertAttention(config, is_cross_attention=True)
        self.grad_checkpointing = False
        init_bert_weights(self)
        nn.init.normal_(self.latents, std=INIT_STD)

    @property
    def num_layers(self) -> int:
        return len(self.cross)

    def forward(self, vision: torch.Tensor, text_layers: Sequence[nn.Module]) -> torch.Tensor:
        if len(text_layers) != self.num_layers:
            raise ValueError(f"universal layers run {self.num_layers} shared text layers, got {len(text_layers)}")
        latents = self.latents.expand(vision.shape[0], -1, -1)  # (B, L, D)
        recompute = self.grad_checkpointing and self.training
        for cross, layer in zip(self.cross, text_layers, strict=True):
            latents = cross(latents, None, vision)[0]  # LN(q + CrossAttn(q, v)), (B, L, D)
            latents = run_layer(layer, recompute, latents)  # shared self-attention + FFN, (B, L, D)
        return self.back(vision, None, latents)[0]  # LN(v + CrossAttn(v, q)), (B, Lv, D)
