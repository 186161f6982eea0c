"""The vision side: a CLIP ViT from timm, all tokens after its final LayerNorm, projected to the
text width when the widths differ.

Images (B, 3, H, W) run through the ViT as they are. Videos (B, T, 3, H, W) run every frame through
the same spatial weights; with mPLUG-2's temporal modules (`model.video.temporal`) each block also
mixes every patch with the same patch in the neighbouring frames, before and after its attention.
A video comes out as the mean of its frames' [CLS] followed by every frame's patches, frame-major:
(B, 1 + T*N, D).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config.schema import VideoConfig, VisionConfig
from pretrain.models.temporal import BlockTemporal


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


def video_block(block: nn.Module, temporal: BlockTemporal | None, x: torch.Tensor, frames: int) -> torch.Tensor:
    """One timm ViT block over frame tokens (B*T, 1 + N, D), with its temporal modules when given."""
    if temporal is None:
        return block(x)
    x = temporal.before(x, frames)
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    x = temporal.after(x, frames)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class VisionEncoder(nn.Module):
    """Images (B, 3, H, W) -> visual states (B, 1 + N, out_width), [CLS] first;
    videos (B, T, 3, H, W) -> (B, 1 + T*N, out_width), the frames' mean [CLS] first."""

    def __init__(self, cfg: VisionConfig, out_width: int, dropout: float = 0.1, video: VideoConfig | None = None):
        super().__init__()
        self.vit = build_vit(cfg)
        self.num_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        # Outside `vit`, so the ViT's names stay timm's and CLIP checkpoints load into it unchanged.
        self.temporal = (
            nn.ModuleList(BlockTemporal(cfg.width, video) for _ in range(cfg.depth))
            if video is not None and video.temporal else None
        )
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

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 4:
            tokens = self.vit.forward_features(pixels)  # (B, 1 + N, width), after the final norm
        elif pixels.dim() == 5:
            tokens = self.encode_video(pixels)  # (B, 1 + T*N, width)
        else:
            raise ValueError(f"vision input must be images (B, 3, H, W) or videos (B, T, 3, H, W), "
                             f"got shape {tuple(pixels.shape)}")
        return self.proj(tokens)  # (B, Lv, out_width)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, 1 + T*N, width): per-frame embeddings, blocks with temporal mixing."""
        clips, frames = video.shape[:2]
        vit = self.vit
        x = vit.patch_embed(video.flatten(0, 1))  # (B*T, N, width)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))  # (B*T, 1 + N, width)
        recompute = vit.grad_checkpointing and torch.is_grad_enabled()
        temporal = self.temporal if self.temporal is not None else [None] * len(vit.blocks)
        for block, mixing in zip(vit.blocks, temporal, strict=True):
            if recompute:
                x = checkpoint(video_block, block, mixing, x, frames, use_reentrant=False)
            else:
                x = video_block(block, mixing, x, frames)
        x = x.reshape(clips, frames, *x.shape[1:])  # (B, T, 1 + N, width)
        cls = x[:, :, 0].mean(dim=1, keepdim=True)  # (B, 1, width)
        patches = x[:, :, 1:].flatten(1, 2)  # (B, T*N, width), frame-major
        # The final norm after the [CLS] mean, as mPLUG-2's released video encoder does, so the video
        # [CLS] is normalised like an image's.
        return vit.norm(torch.cat([cls, patches], dim=1))


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
