"""AdamW parameter groups (weight-decay exclusions, vision learning rate) and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import TrainConfig
from pretrain.models.mplug import MPLUG
from pretrain.optim import build_optimizer, build_scheduler, lr_schedule, param_groups

# lr 1e-3 warming up from 1e-5 over 10 steps, then cosine down to 1e-5 at step 110.
TRAIN = TrainConfig(lr=1e-3, vision_lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=10,
                    max_steps=110, weight_decay=0.02)
# step -> the rate of the lr group
EXPECTED_RATES = {
    0: 1e-5,  # warmup_lr
    5: 5.05e-4,  # half way from 1e-5 to 1e-3
    10: 1e-3,  # end of warmup: lr
    35: 1e-5 + 9.9e-4 * 0.5 * (1 + 2**-0.5),  # a quarter into the cosine: 8.5500e-4
    60: 5.05e-4,  # half way down the cosine
    110: 1e-5,  # max_steps: min_lr
    500: 1e-5,  # beyond: stays at min_lr
}


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return MPLUG(tiny_config().model)


def group_of(groups: list[dict], model: torch.nn.Module) -> dict[str, str]:
    """parameter name -> the name of the group holding it."""
    where = {id(p): g["name"] for g in groups for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


def test_norm_weights_and_biases_take_no_decay(model):
    groups = group_of(param_groups(model, TRAIN), model)
    assert groups["text_encoder.layers.0.attention.output.LayerNorm.weight"] == "no_decay"
    assert groups["text_encoder.layers.0.attention.self.query.bias"] == "no_decay"
    assert groups["fusion.layers.0.intermediate.dense.bias"] == "no_decay"
    assert groups["temp"] == "no_decay"


def test_linear_weights_and_word_embeddings_take_decay(model):
    groups = group_of(param_groups(model, TRAIN), model)
    assert groups["text_encoder.layers.0.attention.self.query.weight"] == "decay"
    assert groups["itm_head.weight"] == "decay"
    assert groups["vision_proj.weight"] == "decay"  # the ITC projection is a head, not the tower
    assert groups["text_encoder.embeddings.word_embeddings.weight"] == "decay"


def test_vision_tower_trains_at_vision_lr_without_decay_on_position_codes(model):
    groups = param_groups(model, TRAIN)
    names = group_of(groups, model)
    assert names["vision.vit.blocks.0.attn.qkv.weight"] == "vision_decay"
    assert names["vision.vit.blocks.0.norm1.weight"] == "vision_no_decay"
    assert names["vision.vit.pos_embed"] == "vision_no_decay"
    assert names["vision.vit.cls_token"] == "vision_no_decay"
    assert all(group.startswith("vision_") == name.startswith("vision.") for name, group in names.items())
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {
        "decay": (1e-3, 0.02),
        "no_decay": (1e-3, 0.0),
        "vision_decay": (1e-4, 0.02),
        "vision_no_decay": (1e-4, 0.0),
    }


def test_vision_width_projection_belongs_to_the_vision_groups(tiny_config):
    model = MPLUG(tiny_config("model.vision.width=32").model)  # 32 -> 64: Linear, LayerNorm, Dropout
    names = group_of(param_groups(model, TRAIN), model)
    assert names["vision.proj.0.weight"] == "vision_decay"
    assert names["vision.proj.1.weight"] == "vision_no_decay"


def test_every_trainable_parameter_is_in_exactly_one_group_and_momentum_in_none(model):
    members = [id(p) for g in param_groups(model, TRAIN) for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    momentum = {id(p) for p in model.momentum.parameters()}
    assert len(members) == len(set(members))
    assert set(members) == trainable
    assert not momentum & set(members)
    assert len(momentum) > 0


def test_frozen_parameters_are_left_out(model):
    model.vision.requires_grad_(False)
    names = {g["name"] for g in param_groups(model, TRAIN)}
    assert names == {"decay", "no_decay"}


@pytest.mark.parametrize("step", sorted(EXPECTED_RATES))
def test_schedule_factor_gives_the_lr_group_its_rate(step):
    assert lr_schedule(TRAIN)(step) * TRAIN.lr == pytest.approx(EXPECTED_RATES[step], rel=1e-9)


def test_schedule_peaks_at_the_end_of_warmup():
    f = lr_schedule(TRAIN)
    assert f(9) < f(10) == 1.0
    assert f(11) == pytest.approx((1e-5 + 9.9e-4 * 0.5 * (1 + math.cos(math.pi / 100))) / 1e-3)


def test_schedule_without_warmup_starts_at_lr():
    train = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=100, min_lr=0.0)
    f = lr_schedule(train)
    assert (f(0), f(50), f(100)) == pytest.approx((1.0, 0.5, 0.0))


def test_schedule_rejects_a_min_lr_above_lr():
    with pytest.raises(ValueError, match=r"train.min_lr=0.01 must lie in \[0, train.lr=0.001\]"):
        lr_schedule(TrainConfig(lr=1e-3, min_lr=1e-2))


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="train.warmup_steps=200 must lie in"):
        lr_schedule(TrainConfig(warmup_steps=200, max_steps=100))


def test_scheduler_steps_each_group_along_the_schedule(model):
    optimizer = build_optimizer(model, TRAIN)
    scheduler = build_scheduler(optimizer, TRAIN)
    seen: dict[int, dict[str, float]] = {}
    for step in range(max(EXPECTED_RATES) + 1):
        seen[step] = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()  # no gradients: nothing moves, only the order of calls matters
        scheduler.step()
    for step, rate in EXPECTED_RATES.items():
        assert seen[step]["decay"] == pytest.approx(rate, rel=1e-9)
        assert seen[step]["no_decay"] == pytest.approx(rate, rel=1e-9)
        assert seen[step]["vision_decay"] == pytest.approx(rate * 0.1, rel=1e-9)
        assert seen[step]["vision_no_decay"] == pytest.approx(rate * 0.1, rel=1e-9)


def test_optimizer_keeps_group_names_and_decay(model):
    optimizer = build_optimizer(model, TRAIN)
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("decay", 0.02), ("no_decay", 0.0), ("vision_decay", 0.02), ("vision_no_decay", 0.0)
    ]
