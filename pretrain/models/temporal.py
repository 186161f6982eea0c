"""mPLUG-2's local temporal modules: each patch token mixes with the same patch position in the
neighbouring frames, through a small bottleneck with a depthwise convolution over time.

    patches (B*T, N, D) -> LayerNorm -> Linear D->C -> Conv1d over T (depthwise) -> GELU -> Linear C->D
    patches = patches + that;  [CLS] passes unchanged

The up-projection starts at zero, so a new module is the identity: a video model built on a CLIP
ViT begins as the image model applied to every frame, and learns its temporal mixing from there.
A ViT block holds two of them, one before its attention and one after (`BlockTemporal`).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config.schema import VideoConfig


class LocalTemporal(nn.Module):
    """Frame tokens (B*T, 1 + N, D), frame-major within each clip -> the same shape."""

    def __init__(self, width: int, kernel: int = 3, ratio: float = 0.5):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"temporal kernel must be a positive odd number so a clip keeps its length, got {kernel}")
        hidden = int(ratio * width)
        if hidden < 1:
            raise ValueError(f"temporal ratio {ratio} leaves a {hidden}-wide bottleneck for width {width}; "
                             "use a ratio with ratio * width >= 1 (mPLUG-2: 0.5)")
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)  # each channel alone
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        clips_frames, length, _ = tokens.shape
        if clips_frames % frames:
            raise ValueError(f"{clips_frames} frame sequences do not split into clips of {frames} frames")
        clips, patches = clips_frames // frames, length - 1
        x = self.down(self.norm(tokens[:, 1:]))  # (B*T, N, C)
        hidden = x.shape[-1]
        x = x.reshape(clips, frames, patches, hidden).permute(0, 2, 3, 1)  # (B, N, C, T)
        x = self.act(self.conv(x.reshape(clips * patches, hidden, frames)))  # (B*N, C, T)
        x = x.reshape(clips, patches, hidden, frames).permute(0, 3, 1, 2)  # (B, T, N, C)
        x = self.up(x.reshape(clips_frames, patches, hidden))  # (B*T, N, D)
        return torch.cat([tokens[:, :1], tokens[:, 1:] + x], dim=1)  # (B*T, 1 + N, D)


class BlockTemporal(nn.Module):
    """The two temporal modules of one ViT block: `before` its attention and `after` it."""

    def __init__(self, width: int, cfg: VideoConfig):
        super().__init__()
        self.before = LocalTemporal(width, cfg.kernel, cfg.ratio)
        self.after = LocalTemporal(width, cfg.kernel, cfg.ratio)
