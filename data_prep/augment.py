"""Image augmentations of the reference recipes, on uint8 tensors.

Training: RandomResizedCrop (bicubic; scale 0.2-1.0 for pretraining, 0.5-1.0 for fine-tuning),
horizontal flip, RandAugment(2, 7). Evaluation: a plain bicubic resize to the square input.

Images stay uint8 (3, H, W) here, and a video clip (T, 3, H, W) is augmented as one image: one
crop box, one flip and one RandAugment draw for all its frames, so the motion between frames is
kept. CLIP normalisation is `data_prep.batch.normalize`, meant to run on the accelerator on the
collated batch (a quarter of the bytes to move, and no float work in the dataloader workers).

A flip mirrors the scene, so it also swaps the words "left" and "right" in the texts that go with
the image and mirrors boxes; otherwise a caption such as "a red circle left of a blue square"
would become false. Boxes follow resizes and flips; a crop or RandAugment (which shears, rotates
and translates) would move them out of reach, so a task with boxes turns those off.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import v2

RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 7
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios RandomResizedCrop samples from
CROP_ATTEMPTS = 10
PRESETS = {
    # name: (train, crop scale)
    "pretrain": (True, (0.2, 1.0)),
    "finetune": (True, (0.5, 1.0)),
    "eval": (False, (1.0, 1.0)),
}
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)(most)?\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


@dataclass(frozen=True)
class AugmentConfig:
    image_size: int
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    crop: bool = True  # RandomResizedCrop; False resizes the whole image (tasks with boxes)
    flip: bool = True
    randaugment: bool = True

    @classmethod
    def preset(cls, name: str, image_size: int, **changes) -> AugmentConfig:
        if name not in PRESETS:
            raise ValueError(f"augmentation preset {name!r} is not one of {sorted(PRESETS)}")
        train, scale = PRESETS[name]
        base = cls(image_size, train=train, scale=scale, crop=train, flip=train, randaugment=train)
        return cls(**{**base.__dict__, **changes})


def swap_left_right(text: str) -> str:
    """'the leftmost circle, left of a square' -> 'the rightmost circle, right of a square'."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)] + (m.group(2) or ""), text)


def mirror_texts(value):
    """`swap_left_right` through strings, lists and dicts of strings (a sample's task fields)."""
    if isinstance(value, str):
        return swap_left_right(value)
    if isinstance(value, list):
        return [mirror_texts(item) for item in value]
    if isinstance(value, dict):
        return {key: mirror_texts(item) for key, item in value.items()}
    return value


@dataclass
class Augmented:
    image: torch.Tensor  # (3, S, S) uint8, or (T, 3, S, S) for a clip
    flipped: bool
    box: list[float] | None  # [x, y, w, h] in output pixels, when a box was given


def crop_params(rng: random.Random, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area a `scale` fraction, aspect ratio log-uniform in `ratio`.

    Ten tries at a box that fits; failing those, the largest central box within `ratio`.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageAugment:
    """Callable: (uint8 image (3, H, W) or clip (T, 3, H, W), optional box [x, y, w, h]) -> `Augmented`.

    Crop boxes and flips come from `rng` (seeded per loader reader); RandAugment draws from torch's
    generator, which the dataloader seeds per worker.
    """

    def __init__(self, config: AugmentConfig, rng: random.Random | None = None):
        self.config = config
        self.rng = rng or random.Random()
        self.randaugment = v2.RandAugment(num_ops=RANDAUGMENT_OPS, magnitude=RANDAUGMENT_MAGNITUDE)

    def __call__(self, image: torch.Tensor, box: list[float] | None = None) -> Augmented:
        config = self.config
        if box is not None and config.train and (config.crop or config.randaugment):
            raise ValueError("a sample with a box needs crop=False and randaugment=False: both move the box")
        size = config.image_size
        height, width = image.shape[-2:]
        if config.train and config.crop:
            top, left, crop_h, crop_w = crop_params(self.rng, height, width, config.scale)
            image = image[..., top : top + crop_h, left : left + crop_w]
        flipped = config.train and config.flip and self.rng.random() < 0.5
        if flipped:
            image = image.flip(-1)  # cheapest here, on the plain (..., 3, h, w) crop
        # uint8 bicubic with antialias has a fast kernel for channels-last memory: (N, 3, H, W) with
        # NHWC strides. Decoders already give (3, H, W) views of HWC data, so this rarely copies.
        clip = image.dim() == 4  # (T, 3, H, W): the frames are the batch of one interpolate
        frames = image if clip else image.unsqueeze(0)
        frames = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        frames = nn.functional.interpolate(frames, size=(size, size), mode="bicubic", antialias=True)
        if box is not None:
            x, y, w, h = box
            box = [x * size / width, y * size / height, w * size / width, h * size / height]
            if flipped:
                box = [size - box[0] - box[2], box[1], box[2], box[3]]
        image = frames if clip else frames[0]  # (3, S, S) or (T, 3, S, S), channels-last strides
        if config.train and config.randaugment:
            image = self.randaugment(image)  # one draw of ops and magnitudes for every frame of a clip
        return Augmented(image=image, flipped=flipped, box=box)
