"""What every downstream task provides to the fine-tuning trainer.

A task is a `TaskModel`: an `nn.Module` holding the pretrained `MPLUG` as `self.model` (so its
weights export under `model.*` like a pretraining package) with

- `Settings`: a dataclass of the task's knobs (decoding lengths, beams, answer list, ...), read
  from the `task:` section of the fine-tuning config and overridable with `--set task.KEY=VALUE`;
- `loader_fields(train)`: the `LoaderConfig` fields the task needs (which KEY.json field is the
  text, whether boxes ride along, the augmentation preset);
- `forward(batch, step, micro) -> TaskOutput`: the training loss of one micro-batch;
- `evaluate(batches, context) -> dict`: every metric of the task over an evaluation split read
  once (sharded over ranks; `context.gather` brings the per-rank records to rank 0), including
  `baseline`, the chance or majority score of the same split, and writing any results file
  (VQA challenge JSON, COCO caption results) under `context.output`.

A batch is the shard loader's batch on the device: `images` (B, 3, S, S) normalised float,
`input_ids` and `attention_mask` (B, L) of the task's text field, `texts`, `meta` (each sample's
KEY.json), `keys`, and `image_ids` (B,) when every sample has one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config.schema import Config
from pretrain.models.mplug import MPLUG
from pretrain.objectives import distributed


@dataclass
class TaskOutput:
    loss: torch.Tensor  # what the optimizer minimises
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, for logging


@dataclass
class EvalContext:
    output: Path  # results files go here (rank 0 writes them)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, records: list[Any]) -> list[Any]:
        """Every rank's `records` concatenated in rank order on rank 0 (an empty list elsewhere)."""
        if distributed.world_size() == 1:  # no process group: one process holds everything
            return list(records)
        parts: list[list[Any]] | None = [[] for _ in range(self.world_size)] if self.is_main else None
        dist.gather_object(list(records), parts, dst=0)
        return [record for part in parts for record in part] if parts is not None else []

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if distributed.world_size() == 1:  # no process group: one process holds everything
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class TaskModel(nn.Module):
    name: ClassVar[str]  # the TASK of `mplug finetune TASK`
    metric: ClassVar[str]  # the headline key of `evaluate`'s result, compared with `baseline`
    Settings: ClassVar[type]
    uses_momentum: ClassVar[bool] = False  # whether the task needs the momentum copies (ITC distillation)

    def __init__(self, model: MPLUG, settings: Any, tokenizer):
        super().__init__()
        self.model, self.settings, self.tokenizer = model, settings, tokenizer

    def model_config(self, config: Config) -> Config:
        """The config that builds this task's model (a task that grows the model records it here)."""
        return config

    def loader_fields(self, train: bool) -> dict[str, Any]:
        """`LoaderConfig` fields for the training (train=True) or evaluation loader."""
        return {"augment": "finetune" if train else "eval"}

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        self.model.after_optimizer_step()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        raise NotImplementedError
