"""The DeepSpeed engine around the pretraining model: its config from ours, and what ZeRO changes.

The model stays pure torch (`MPLUGPretraining`); this file is where DeepSpeed meets it:
- `deepspeed_config`: ZeRO stage, precision, micro-batch, accumulation and clipping from `Config`;
- `build_engine`: `deepspeed.initialize` with the project's AdamW groups and warmup-cosine schedule;
- `momentum_update`: the EMA step after each optimizer step. Under ZeRO-3 every rank holds only
  its partition of each parameter (and the module's tensors are empty placeholders outside a
  forward), so the update runs on the partitions, which line up between a module and its copy.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config.schema import Config
from pretrain.objectives.pretraining import MPLUGPretraining
from pretrain.optim import build_optimizer, build_scheduler

QUIET_STEPS = 10**9  # DeepSpeed's own step printing: off, the trainer reports progress


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    train = config.train
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accumulation,
        "train_batch_size": train.batch_size * train.grad_accumulation * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,  # the project's AdamW groups, not DeepSpeed's fused Adam
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def build_engine(model: MPLUGPretraining, config: Config, world_size: int):
    """(engine, optimizer, scheduler): the model wrapped by DeepSpeed with the project's optimizer."""
    import deepspeed

    optimizer = build_optimizer(model.model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size), dist_init_required=False,
    )
    return engine, optimizer, scheduler


def input_dtype(config: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.train.precision]


@torch.no_grad()
def momentum_update(model: MPLUGPretraining, zero_stage: int) -> None:
    """Clamp the temperature and move the EMA copies, on full tensors or on ZeRO-3 partitions."""
    mplug = model.model
    if zero_stage < 3:
        mplug.after_optimizer_step()
        return
    cfg = mplug.cfg
    temp = mplug.temp.ds_tensor if hasattr(mplug.temp, "ds_tensor") else mplug.temp
    temp.clamp_(cfg.temp_min, cfg.temp_max)
    if mplug.momentum is None:
        return
    sources = [p.ds_tensor for p in torch.nn.ModuleDict(mplug.momentum_sources()).parameters()]
    targets = [p.ds_tensor for p in mplug.momentum.parameters()]
    torch._foreach_lerp_(targets, sources, 1.0 - cfg.momentum)
