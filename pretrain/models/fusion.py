"""The cross-modal skip-connected fusion.

F layers with stride S. Layer j is an *asymmetric co-attention* layer when j == 0 or j % S != 0:
the text attends to itself and then to the vision states, and the vision states pass through
untouched (no self-attention over the long visual sequence: the saving). Otherwise it is a
*connected-attention* layer: self-attention and FFN over the concatenation [v ; l], after which the
text takes the new text states and the vision states add theirs as a residual: v = v + v_new.

Only the F layers that run are allocated, and a connected layer has no cross-attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from pretrain.config.schema import FusionConfig, TextConfig
from pretrain.models.attention_mask import padding_mask
from pretrain.models.text import bert_config, init_bert_weights, run_layer

LayerKind = Literal["co", "connected"]


def fusion_pattern(layers: int, stride: int) -> list[LayerKind]:
    """The kind of each fusion layer: 'co' (asymmetric co-attention) or 'connected'."""
    if layers < 1 or stride < 1:
        raise ValueError(f"fusion needs layers >= 1 and stride >= 1, got layers={layers}, stride={stride}")
    return ["co" if j == 0 or j % stride != 0 else "connected" for j in range(layers)]


@dataclass
class FusionOutput:
    vision: torch.Tensor  # (B, Lv, D)
    text: torch.Tensor  # (B, Lt, D)

    def joint(self) -> torch.Tensor:
        """[v ; l] (B, Lv + Lt, D), image tokens first: what the decoder attends to."""
        return torch.cat([self.vision, self.text], dim=1)


class CoAttentionLayer(nn.Module):
    """l = LN(l + SelfAttn(l)); l = LN(l + CrossAttn(l, v)); l = LN(l + FFN(l)); v unchanged."""

    kind: LayerKind = "co"

    def __init__(self, cfg: TextConfig):
        super().__init__()
        config = bert_config(cfg)
        self.attention = BertAttention(config)
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.attention(text, text_mask)[0]
        text = self.crossattention(text, None, vision, vision_mask)[0]
        text = self.output(self.intermediate(text), text)
        return text, vision


class ConnectedAttentionLayer(nn.Module):
    """x = [v ; l]; x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)); l = x_l; v = v + x_v."""

    kind: LayerKind = "connected"

    def __init__(self, cfg: TextConfig):
        super().__init__()
        config = bert_config(cfg)
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_vision = vision.shape[1]
        joint = torch.cat([vision, text], dim=1)  # (B, Lv + Lt, D)
        joint_mask = torch.cat([vision_mask, text_mask], dim=-1)  # (B, 1, 1, Lv + Lt)
        joint = self.attention(joint, joint_mask)[0]
        joint = self.output(self.intermediate(joint), joint)
        vision_new, text = joint[:, :num_vision], joint[:, num_vision:]
        return text, vision + vision_new  # the skip-connection residual on the vision side


class FusionEncoder(nn.Module):
    """Text states (B, Lt, D) and vision states (B, Lv, D) -> fused states of both."""

    def __init__(self, text: TextConfig, fusion: FusionConfig):
        super().__init__()
        self.pattern = fusion_pattern(fusion.layers, fusion.stride)
        self.layers = nn.ModuleList(
            CoAttentionLayer(text) if kind == "co" else ConnectedAttentionLayer(text) for kind in self.pattern
        )
        self.grad_checkpointing = False
        init_bert_weights(self)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        vision: torch.Tensor,
        vision_mask: torch.Tensor | None = None,
    ) -> FusionOutput:
        if vision_mask is None:
            vision_mask = torch.ones(vision.shape[:2], dtype=torch.long, device=vision.device)
        text_mask4, vision_mask4 = padding_mask(text_mask), padding_mask(vision_mask)
        recompute = self.grad_checkpointing and self.training
        for layer in self.layers:
            text, vision = run_layer(layer, recompute, text, text_mask4, vision, vision_mask4)
        return FusionOutput(vision=vision, text=text)
