"""Fine-tuning configuration: presets, the tiny overlay, overrides, and the task resolution."""

from __future__ import annotations

import pytest
import torch

from finetune.config import load_finetune_config, run_config
from finetune.registry import task_class
from finetune.resolution import at_resolution
from pretrain.config import ConfigError
from pretrain.models.factory import build_mplug
from pretrain.models.vision import resize_position_embedding


def test_a_task_preset_carries_the_reference_resolution_and_learning_rates():
    vqa = load_finetune_config(task_class("vqa"))
    assert (vqa.image_size, vqa.train.lr, vqa.train.vision_lr, vqa.eval_split) == (504, 2e-5, 2e-6, "val")
    assert vqa.task.beams == 5 and vqa.task.max_length == 10


def test_the_tiny_overlay_applies_its_common_and_per_task_sections():
    grounding = load_finetune_config(task_class("grounding"), "tiny")
    caption = load_finetune_config(task_class("caption"), "tiny")
    assert grounding.image_size == caption.image_size == 64
    assert grounding.train.lr == 3e-4 and caption.train.lr == 1e-3  # grounding's own section
    assert caption.task.min_length == 2 and grounding.train.precision == "fp32"


def test_overrides_reach_the_run_the_trainer_and_the_task_settings():
    config = load_finetune_config(task_class("caption"), "tiny", ["epochs=2", "train.lr=5e-4", "task.beams=3"])
    assert (config.epochs, config.train.lr, config.task.beams) == (2, 5e-4, 3)


def test_an_unknown_task_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match="task has no key 'beam'.*beams"):
        load_finetune_config(task_class("vqa"), None, ["task.beam=3"])


def test_an_unknown_task_is_a_configuration_error():
    with pytest.raises(ConfigError, match="unknown task 'ocr'; choose one of vqa, caption, retrieval, grounding"):
        task_class("ocr")


def test_the_model_moves_to_the_task_resolution_with_resized_position_embeddings(tiny_config):
    pretraining = tiny_config()
    model = build_mplug(pretraining.model, momentum=True)
    finetune = load_finetune_config(task_class("vqa"), "tiny", ["image_size=96"])
    config = run_config(pretraining, finetune)
    resized = at_resolution(model, config)
    assert resized.cfg.vision.image_size == 96
    grid = 96 // pretraining.model.vision.patch_size
    expected = resize_position_embedding(model.vision.vit.pos_embed.detach(), grid)
    assert torch.equal(resized.vision.vit.pos_embed, expected)
    assert torch.equal(resized.momentum.vision.vit.pos_embed, expected)  # the momentum copy too
    assert torch.equal(resized.decoder.embeddings.word_embeddings.weight, model.decoder.embeddings.word_embeddings.weight)
    assert resized.encode_image(torch.zeros(1, 3, 96, 96)).shape[1] == 1 + grid * grid
