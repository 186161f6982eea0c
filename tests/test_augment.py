"""Augmentations: the reference recipes, flips that keep texts and boxes true, uint8 throughout."""

from __future__ import annotations

import random

import pytest
import torch

from data_prep.augment import AugmentConfig, ImageAugment, mirror_texts, swap_left_right
from data_prep.batch import CLIP_MEAN, normalize


def left_half_red(height=40, width=80) -> torch.Tensor:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0, :, : width // 2] = 255
    return image


class AlwaysFlip(random.Random):
    def random(self) -> float:
        return 0.0


def test_presets_follow_the_reference_crop_scales():
    assert AugmentConfig.preset("pretrain", 256).scale == (0.2, 1.0)
    assert AugmentConfig.preset("finetune", 384).scale == (0.5, 1.0)
    evaluation = AugmentConfig.preset("eval", 384)
    assert (evaluation.train, evaluation.crop, evaluation.flip, evaluation.randaugment) == (False, False, False, False)
    with pytest.raises(ValueError, match="not one of"):
        AugmentConfig.preset("train", 256)


def test_evaluation_resizes_the_whole_image_to_the_square_input():
    out = ImageAugment(AugmentConfig.preset("eval", 32))(left_half_red())
    assert out.image.dtype == torch.uint8 and out.image.shape == (3, 32, 32)
    assert out.image[0, :, :14].min() > 240 and out.image[0, :, 18:].max() < 15
    assert not out.flipped


def test_a_flip_mirrors_the_image_and_the_box():
    config = AugmentConfig.preset("finetune", 40, crop=False, randaugment=False)
    out = ImageAugment(config, AlwaysFlip())(left_half_red(), box=[0.0, 10.0, 40.0, 20.0])
    assert out.flipped
    assert out.image[0, :, 22:].min() > 240 and out.image[0, :, :18].max() < 15  # red is now on the right
    assert out.box == pytest.approx([20.0, 10.0, 20.0, 20.0])  # x scaled by 40/80 then mirrored


def test_a_box_is_refused_with_a_crop_or_randaugment():
    with pytest.raises(ValueError, match="crop=False and randaugment=False"):
        ImageAugment(AugmentConfig.preset("finetune", 32))(left_half_red(), box=[0, 0, 5, 5])


def test_training_crops_to_the_input_size_and_keeps_uint8():
    out = ImageAugment(AugmentConfig.preset("pretrain", 24))(left_half_red())
    assert out.image.shape == (3, 24, 24) and out.image.dtype == torch.uint8


def test_mirroring_swaps_left_and_right_in_every_text_field():
    assert swap_left_right("a red circle left of a blue square") == "a red circle right of a blue square"
    assert swap_left_right("The leftmost shape, Right?") == "The rightmost shape, Left?"
    assert swap_left_right("leftover bright light") == "leftover bright light"
    meta = {"question": "what is left of the circle?", "answers": ["right", "no"], "image_id": 3}
    assert mirror_texts(meta) == {"question": "what is right of the circle?", "answers": ["left", "no"], "image_id": 3}


def test_normalize_applies_the_clip_statistics():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx((1.0 - CLIP_MEAN[0]) / 0.26862954, rel=1e-5)
