"""The text side, built from transformers' BERT blocks: the text encoder, the decoder with its LM
head, and the MLM head. Parameter names follow the Hugging Face BERT layout below each module's
prefix (`embeddings.*`, `layers.N.attention.self.query.*`, `head.predictions.*`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from pretrain.config.schema import TextConfig
from pretrain.models.attention_mask import causal_padding_mask, padding_mask

INIT_STD = 0.02  # BERT's initializer_range


def bert_config(cfg: TextConfig, *, decoder: bool = False) -> BertConfig:
    config = BertConfig(
        vocab_size=cfg.vocab_size + (cfg.decoder_extra_tokens if decoder else 0),
        hidden_size=cfg.width,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_id,
        is_decoder=decoder,
        add_cross_attention=decoder,
        initializer_range=INIT_STD,
    )
    config._attn_implementation = "sdpa"  # scaled_dot_product_attention: flash kernels on GPUs
    return config


def init_bert_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """BERT's initialisation: N(0, std) for linear and embedding weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("predictions.bias"):
            nn.init.zeros_(p)


def run_layer(layer: nn.Module, recompute: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """Run one block, recomputing its activations in the backward pass when `recompute` is set."""
    if recompute:
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> text states (B, L, D): BERT embeddings and self-attention layers."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        config = bert_config(cfg)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(cfg.encoder_layers))
        self.grad_checkpointing = False
        init_bert_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, D)
        mask = padding_mask(attention_mask)  # (B, 1, 1, L)
        recompute = self.grad_checkpointing and self.training
        for layer in self.layers:
            hidden = run_layer(layer, recompute, hidden, mask)
        return hidden


class MLMHead(nn.Module):
    """Text states (B, L, D) -> vocabulary logits (B, L, V); the output matrix is tied to `embedding`."""

    def __init__(self, cfg: TextConfig, embedding: nn.Embedding):
        super().__init__()
        config = bert_config(cfg)
        config.vocab_size = embedding.num_embeddings  # the decoder's may hold extra tokens
        self.head = BertOnlyMLMHead(config)
        init_bert_weights(self.head)
        predictions = self.head.predictions
        predictions.decoder.weight = embedding.weight
        predictions.bias = predictions.decoder.bias  # one output bias under both of BERT's names

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


class TextDecoder(nn.Module):
    """Causal BERT with cross-attention to a memory and an LM head tied to its word embeddings.

    ids (B, L), mask (B, L), memory (B, M, D), memory_mask (B, M) -> logits (B, L, V).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        config = bert_config(cfg, decoder=True)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(cfg.decoder_layers))
        init_bert_weights(self)
        self.lm_head = MLMHead(cfg, self.embeddings.word_embeddings)
        self.grad_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, D)
        self_mask = causal_padding_mask(attention_mask)  # (B, 1, L, L)
        cross_mask = padding_mask(memory_mask)  # (B, 1, 1, M)
        recompute = self.grad_checkpointing and self.training
        for layer in self.layers:
            hidden = run_layer(layer, recompute, hidden, self_mask, memory, cross_mask)
        return self.lm_head(hidden)  # (B, L, V)
