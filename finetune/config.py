"""The configuration of a fine-tuning run: the task's preset, an optional overlay, `--set` overrides.

    image_size: 384        the task resolution (position embeddings are resized to it)
    epochs: 5              over the train split; `--max-steps` overrides the count it gives
    train_split / eval_split
    train: {...}           pretrain's TrainConfig (batch, learning rates, ZeRO, precision, ...)
    data: {...}            pretrain's DataConfig (text length, RandAugment, workers, shuffle)
    task: {...}            the task's own Settings (beams, answer list, SCST, ...)

Presets live in `finetune/presets/TASK.yaml`; `--preset tiny` lays `presets/tiny.yaml` over the
task's preset, then its `tasks: {TASK: {...}}` section (any of the keys above) for that task. Every key is checked against
the schema: an unknown key is an error naming the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field, make_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pretrain.config import Config, ConfigError
from pretrain.config.presets import read_yaml
from pretrain.config.schema import DataConfig, TrainConfig
from pretrain.config.typed import apply_overrides, from_dict

PRESET_DIR = "presets"


@dataclass
class FinetuneRun:
    image_size: int = 384
    epochs: float = 5.0
    train_split: str = "train"
    eval_split: str = "val"
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def schema_for(task_cls: type) -> type:
    """FinetuneRun with a `task` section of the task's Settings type."""
    return make_dataclass(f"{task_cls.__name__}Config", [("task", task_cls.Settings,
                                                            field(default_factory=task_cls.Settings))],
                          bases=(FinetuneRun,))


def preset_names() -> list[str]:
    folder = resources.files("finetune") / PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset(name: str) -> dict:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        if not Path(name).is_file():
            raise ConfigError(f"fine-tuning preset file {name!r} does not exist")
        return read_yaml(name)
    if name not in preset_names():
        raise ConfigError(f"unknown fine-tuning preset {name!r}; choose one of {', '.join(preset_names())} "
                          "or a YAML file")
    with resources.as_file(resources.files("finetune") / PRESET_DIR / f"{name}.yaml") as path:
        return read_yaml(path)


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_finetune_config(task_cls: type, overlay: str | None = None, overrides: Iterable[str] = ()) -> Any:
    """The task's preset, `overlay` laid over it, then the dotted overrides; checked against the schema."""
    data = _preset(task_cls.name)
    if overlay:
        extra = _preset(overlay)
        per_task = extra.pop("tasks", {}) or {}
        if not isinstance(per_task, dict):
            raise ConfigError(f"preset {overlay!r}: `tasks` must map task names to task settings")
        data = merged(data, extra)
        data = merged(data, per_task.get(task_cls.name) or {})
    schema = schema_for(task_cls)
    return from_dict(schema, apply_overrides(schema, data, overrides))


def run_config(package_config: Config, finetune: Any) -> Config:
    """The model's config from its package with the fine-tuning run's resolution, training and data settings."""
    vision = dataclasses.replace(package_config.model.vision, image_size=finetune.image_size)
    model = dataclasses.replace(package_config.model, vision=vision)
    return dataclasses.replace(package_config, model=model, train=finetune.train, data=finetune.data)
