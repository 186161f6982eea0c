"""The optimizer and learning-rate schedule of pretraining: AdamW over four parameter groups, linear
warmup then cosine decay.

Groups: the vision tower (every `VisionEncoder`: the ViT and its width projection, when there is
one) trains at `train.vision_lr`, everything else at `train.lr`; each splits into a group with
weight decay and one without. Frozen parameters (the momentum copies) are left out.

No weight decay, for parameters that are not the matrix of a linear map:
- every parameter with ndim <= 1: biases, LayerNorm gains and shifts, the MLM output bias, and
  the ITC temperature, a scalar that decay would pull toward 0, i.e. toward ever sharper logits;
- every parameter of a normalisation layer, whatever its shape;
- what a module lists in timm's `no_weight_decay()`: the ViT's position embeddings and class token.
  They are learned codes for positions and the [CLS] slot, not weights that scale an input;
  shrinking them only erases position information (timm, DeiT and BEiT exclude them likewise).
The BERT word, position and token-type embeddings keep their decay, as in BERT and mPLUG: the word
embeddings are also the MLM and LM output matrices.

Schedule, as a factor of each group's base rate (so both groups follow one shape and keep their
ratio): `train.warmup_lr` and `train.min_lr` are absolute rates of the `train.lr` group, as in the
base preset (lr 1e-4, warmup from 1e-6, cosine down to 1e-6); the vision group is scaled by the same
factor, so it runs from warmup_lr * vision_lr / lr up to vision_lr and down to min_lr * vision_lr / lr.

    step < warmup_steps:           lr(step) = warmup_lr + (lr - warmup_lr) * step / warmup_steps
    warmup_steps <= step < max:    lr(step) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
                                   p = (step - warmup_steps) / (max_steps - warmup_steps)
    step >= max_steps:             lr(step) = min_lr

`step` counts optimizer steps from 0: the LambdaLR of `build_scheduler` gives the first step
lr(0) and moves on by one at each `scheduler.step()` after `optimizer.step()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config.schema import TrainConfig
from pretrain.models.vision import VisionEncoder

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
GROUPS = ("decay", "no_decay", "vision_decay", "vision_no_decay")


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that take no weight decay (see the module docstring)."""
    excluded: set[int] = set()
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        excluded.update(id(p) for p in own.values() if p.ndim <= 1 or isinstance(module, NORM_TYPES))
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):  # timm's hook: names relative to the module, some possibly absent
            below = dict(module.named_parameters())
            excluded.update(id(below[name]) for name in listed() if name in below)
    return excluded


def vision_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of every vision tower in `model`."""
    return {id(p) for m in model.modules() if isinstance(m, VisionEncoder) for p in m.parameters()}


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, each with `name`, `lr` and `weight_decay`.

    In the order of GROUPS, empty ones left out; a tied parameter appears once.
    """
    no_decay, vision = no_decay_parameters(model), vision_parameters(model)
    members: dict[tuple[bool, bool], list[nn.Parameter]] = {  # (vision?, decays?) -> parameters
        (is_vision, decays): [] for is_vision in (False, True) for decays in (True, False)
    }
    for p in model.parameters():  # tied parameters are yielded once
        if p.requires_grad:
            members[(id(p) in vision, id(p) not in no_decay)].append(p)
    if not any(members.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True) to optimize")
    return [
        {
            "name": ("vision_" if is_vision else "") + ("decay" if decays else "no_decay"),
            "params": params,
            "lr": train.vision_lr if is_vision else train.lr,
            "weight_decay": train.weight_decay if decays else 0.0,
        }
        for (is_vision, decays), params in members.items()
        if params
    ]


@dataclass(frozen=True)
class WarmupCosine:
    """The learning-rate factor at an optimizer step: lr(step) / lr, see the module docstring."""

    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def rate(self, step: int) -> float:
        """The absolute rate of the `lr` group at `step`."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if step >= self.max_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.rate(step) / self.lr


def lr_schedule(train: TrainConfig) -> WarmupCosine:
    """The factor f(step) that multiplies every group's base rate; checks the config's values."""
    problems = []
    if train.lr <= 0:
        problems.append(f"train.lr={train.lr} must be positive")
    if not 0 <= train.warmup_lr <= train.lr:
        problems.append(f"train.warmup_lr={train.warmup_lr} must lie in [0, train.lr={train.lr}]")
    if not 0 <= train.min_lr <= train.lr:
        problems.append(f"train.min_lr={train.min_lr} must lie in [0, train.lr={train.lr}]")
    if train.max_steps <= 0:
        problems.append(f"train.max_steps={train.max_steps} must be positive")
    if not 0 <= train.warmup_steps <= train.max_steps:
        problems.append(f"train.warmup_steps={train.warmup_steps} must lie in [0, train.max_steps={train.max_steps}]")
    if problems:
        raise ValueError("learning-rate schedule: " + "; ".join(problems))
    return WarmupCosine(train.lr, train.warmup_lr, train.min_lr, train.warmup_steps, train.max_steps)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW (PyTorch's default betas and eps, as mPLUG) over `param_groups(model, train)`."""
    return torch.optim.AdamW(param_groups(model, train), lr=train.lr, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_schedule(train)` to every group's base rate; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train))
