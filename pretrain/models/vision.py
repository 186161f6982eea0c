"""The vision side: a CLIP ViT from timm, all tokens after its final LayerNorm, projected to the
text width when the widths differ."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.schema import VisionConfig


def build_vit(cfg: VisionConfig) -> nn.Module:
    """A timm CLIP ViT with the sizes of `cfg`, random weights, no classifier and no pooling."""
    return timm.create_model(
        cfg.arch,
        pretrained=False,  # weights come from local files only (pretrain.models.weights)
        num_classes=0,
        global_pool="",
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        act_layer="quick_gelu" if cfg.quick_gelu else "gelu",
        drop_path_rate=cfg.drop_path,
    )


class VisionEncoder(nn.Module):
    """Images (B, 3, H, W) -> visual states (B, 1 + N, out_width), [CLS] first."""

    def __init__(self, cfg: VisionConfig, out_width: int, dropout: float = 0.1):
        super().__init__()
        self.vit = build_vit(cfg)
        self.num_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        if cfg.width != out_width:
            # The large model's 1024->768 bridge: Linear, LayerNorm (BERT's eps), Dropout.
            self.proj = nn.Sequential(
                nn.Linear(cfg.width, out_width),
                nn.LayerNorm(out_width, eps=1e-12),
                nn.Dropout(dropout),
            )
        else:
            self.proj = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(images)  # (B, 1 + N, width), after the final norm
        return self.proj(tokens)  # (B, 1 + N, out_width)


def resize_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize ViT position embeddings to a `grid` x `grid` patch grid, bilinearly; [CLS] is kept.

    Accepts (1 + g*g, D) or (1, 1 + g*g, D) and returns the same rank.
    """
    squeeze = pos_embed.dim() == 2
    pe = pos_embed.unsqueeze(0) if squeeze else pos_embed
    if pe.dim() != 3:
        raise ValueError(f"position embeddings must be (1+N, D) or (1, 1+N, D), got {tuple(pos_embed.shape)}")
    cls, patches = pe[:, :1], pe[:, 1:]
    old = round(patches.shape[1] ** 0.5)
    if old * old != patches.shape[1]:
        raise ValueError(
            f"position embeddings hold {patches.shape[1]} patch positions, not a square grid; "
            "expected 1 [CLS] position followed by g*g patch positions"
        )
    if old != grid:
        dim = patches.shape[-1]
        patches = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches.float(), size=(grid, grid), mode="bilinear", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pe.dtype)  # (1, G*G, D)
    out = torch.cat([cls, patches], dim=1)
    return out[0] if squeeze else out
