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

A batch is the shard loader's batch on the device: `images` (B, 3, S, S) normalised float, or
(B, T, 3, S, S) clips of `data.frames` frames for a video task (`video = True`), `input_ids` and
`attention_mask` (B, L) of the task's text field, `texts`, `meta` (each sample's KEY.json), `keys`,
and `image_ids` (B,) when every sample has one.

A task's weights are `model.*` (the MPLUG, exported as a model package). What a task adds travels
in the same package as side files (`package_files`, read back by `load_package_files` when
`mplug predict` rebuilds the task): the tensors of its own trained modules (`packaged_modules`, an
action-classification head) as TASK_WEIGHTS_FILE, and anything it read from the data in
`prepare_data` (class names, an answer list built from the train split).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save
from torch import nn

from pretrain.config.schema import Config
from pretrain.models.mplug import MPLUG
from pretrain.objectives import distributed
from pretrain.package import read_package_info

T = TypeVar("T")
TASK_WEIGHTS_FILE = "task.safetensors"  # in a task's model package: the tensors of `packaged_modules`


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

    def on_main(self, compute: Callable[[], T]) -> T:
        """`compute()` on rank 0, its result on every rank; its error is raised on every rank too, so
        no rank waits forever for a result rank 0 never sends."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = compute()
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                outcome = error
        outcome = self.broadcast(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

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
    video: ClassVar[bool] = False  # whether the task reads clips of `data.frames` frames instead of images
    packaged_modules: ClassVar[tuple[str, ...]] = ()  # the task's own trained submodules, exported with the model

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

    def prepare_data(self, data: Path, train_split: str) -> None:
        """Read what the task needs from the fine-tuning data before training and evaluation (an answer
        list, class names); `data` holds one folder per split. Runs before the optimizer is built."""

    def packaged_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of `packaged_modules` out of this task's full state dict (e.g. consolidated on rank 0)."""
        return {name: tensor for name, tensor in state.items() if name.split(".", 1)[0] in self.packaged_modules}

    def package_files(self, state: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        """Files the task adds to its model package, by name: the `packaged_modules` tensors, if any."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.packaged_state(state).items()}
        return {TASK_WEIGHTS_FILE: save(tensors)} if tensors else {}

    def load_package_files(self, directory: Path) -> None:
        """Take back what `package_files` wrote: the `packaged_modules` tensors, strictly."""
        if not self.packaged_modules:
            return
        path = Path(directory) / TASK_WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no {TASK_WEIGHTS_FILE}: a {self.name} package carries the "
                                    f"weights of {', '.join(self.packaged_modules)} there, as `mplug finetune "
                                    f"{self.name}` exports them; re-export the package from that run")
        stored = load_file(str(path))
        expected = self.packaged_state(self.state_dict())
        if stored.keys() != expected.keys():
            raise ValueError(f"{path} holds {sorted(stored)} but the {self.name} task has {sorted(expected)}: "
                             "the package was written by a task with other settings")
        wrong = [name for name, tensor in stored.items() if tensor.shape != expected[name].shape]
        if wrong:
            name = wrong[0]
            raise ValueError(f"{path}: {name} is {tuple(stored[name].shape)} but the task's is "
                             f"{tuple(expected[name].shape)}; its settings (e.g. num_classes) differ from the package's")
        self.load_state_dict(stored, strict=False)  # the model's own tensors came with the package's MPLUG

    def continue_from(self, directory: Path) -> bool:
        """Take back the side files of an init package this same task wrote (fine-tuning further, or
        `--eval-only`, from a fine-tuned model: its head, not a new one); False for any other package."""
        if read_package_info(directory).extra.get("task") != self.name:
            return False
        self.load_package_files(directory)
        return True

    def after_optimizer_step(self) -> None:
        self.model.after_optimizer_step()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        raise NotImplementedError
