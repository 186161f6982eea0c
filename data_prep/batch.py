"""Turning images and captions into model inputs: CLIP-normalised tensors and padded token ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image resized (bicubic) to size x size -> (3, size, size), CLIP mean/std normalised."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (array - mean) / std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) or clips (B, T, 3, H, W) from the loader -> float, CLIP mean/std
    normalised, on their device."""
    if images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(f"expected images (B, 3, H, W) or clips (B, T, 3, H, W); got shape {tuple(images.shape)}")
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(3, 1, 1)  # broadcasts over (B,) or (B, T)
    std = torch.tensor(CLIP_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def tokenize(tokenizer, captions: Sequence[str], max_length: int, pad_to_max: bool = False) -> dict[str, torch.Tensor]:
    """`[CLS] caption [SEP]` truncated at `max_length`, padded to the longest caption or to `max_length`.

    Fixed-length batches (`pad_to_max`) have the same shape on every rank, which gathering text
    states across ranks needs.
    """
    encoded = tokenizer(
        list(captions), padding="max_length" if pad_to_max else "longest", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
