"""Fine-tuning: the pretraining trainer with a task's loss and loaders, then the task's evaluation.

Everything of the pretraining run carries over (DeepSpeed engine, launchers, checkpoints with
exact resume, preemption, non-finite skipping, model packages, MLflow); this adds:
- the task's training loader over DATA/<train_split> and its forward;
- video tasks (`task.video`) read clips of `data.frames` frames; a task's own trained modules
  and what the task read from the data ship in the package as side files (`task.package_files`);
- after the last step, the evaluation over DATA/<eval_split> sharded over ranks, logged to MLflow
  as `eval/<metric>` and written to OUTPUT/metrics.json;
- lineage: the run is tagged with the init source and its parent (pretraining) run, and the model
  package is registered as `mplug-<task>`, its version tagged with the parent run too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.batch import normalize
from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.shard_source import read_shard, resolve_shards
from finetune.init_source import InitSource
from finetune.tasks.base import EvalContext, TaskModel
from pretrain.config import to_dict
from pretrain.init_package import TAG_INIT, TAG_PARENT
from pretrain.trainer import RunOptions, Trainer

log = logging.getLogger("mplug.finetune")

METRICS_FILE = "metrics.json"
TAG_TASK = "mplug.task"
EVAL_WORKERS = 1  # evaluation reads one split once; one reader process per rank keeps the order simple


@dataclass
class FinetuneOptions(RunOptions):
    task_config: Any = None  # the resolved fine-tuning config (finetune.config)
    init: InitSource | None = None
    eval_batch_size: int = 0  # 0: train.batch_size
    register: bool = True  # register the model package as mplug-<task>


def split_folder(data: str | Path, split: str) -> str:
    folder = Path(data) / split
    if not folder.is_dir():
        present = sorted(p.name for p in Path(data).iterdir() if p.is_dir()) if Path(data).is_dir() else []
        raise FileNotFoundError(f"no split {split!r} under {data}: expected {folder} (a converter's output holds "
                                f"one folder per split); found {', '.join(present) or 'nothing'}")
    return str(folder)


def steps_for_epochs(data: str | Path, split: str, epochs: float, global_batch: int) -> int:
    samples = sum(shard.count or 0 for shard in resolve_shards(split_folder(data, split)))
    if samples == 0:
        raise ValueError(f"the {split} split under {data} records no samples in its manifest; pass --max-steps")
    return max(1, math.ceil(epochs * samples / global_batch))


def reference_sets(split: str) -> list[list[str]]:
    """Every image's reference captions in a caption split (KEY.json `captions`), once per image."""
    seen: dict[Any, list[str]] = {}

    def skip(url: str, error: Exception) -> None:
        log.warning("shard %s unreadable, its references skipped: %s", url, error)

    for shard in resolve_shards(split):
        for sample in read_shard(shard.url, skip):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if meta.get("captions"):
                seen.setdefault(meta.get("image_id", sample["__key__"]), meta["captions"])
    if not seen:
        raise ValueError(f"no sample of {split} carries `captions` in its KEY.json: SCST needs the references "
                         "of each training image (a coco_karpathy or flickr30k conversion writes them)")
    return list(seen.values())


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The loader's batch on the device, images normalised and cast to the compute dtype."""
    out = {key: (value.to(device) if isinstance(value, torch.Tensor) else value) for key, value in batch.items()}
    out["images"] = normalize(out["images"]).to(dtype)
    return out


class FinetuneTrainer(Trainer):
    stage = "finetune"

    def __init__(self, config, options: FinetuneOptions, place, tokenizer, task: TaskModel):
        # Before the engine exists: what the task reads from the data (class names) can shape its modules,
        # and a fine-tuned init of the same task brings its own (an action head) back.
        task.prepare_data(Path(options.data), options.task_config.train_split)
        if options.init is not None and task.continue_from(options.init.directory):
            log.info("continuing the fine-tuned %s model %s, with what its package adds to the model", task.name,
                     options.init.uri)
        super().__init__(config, options, place, tokenizer, model=task)
        self.task = task
        if getattr(task.settings, "scst", False) and options.max_steps > 0:
            # CIDEr-D's document frequencies come from every reference set of the training split
            task.set_reference_corpus(reference_sets(split_folder(options.data, options.task_config.train_split)))

    def loader_config(self, train: bool) -> LoaderConfig:
        data, train_cfg = self.config.data, self.config.train
        fields = self.task.loader_fields(train)
        batch = train_cfg.batch_size if train else (self.options.eval_batch_size or train_cfg.batch_size)
        settings = {
            "batch_size": batch, "image_size": self.config.model.vision.image_size,
            "mode": "resampled" if train else "epoch", "randaugment": data.randaugment if train else False,
            "workers": data.workers if train else EVAL_WORKERS, "shuffle_buffer": data.shuffle_buffer if train else 0,
            "seed": train_cfg.seed, "max_text_length": data.max_text_length, "pad_to_max": True,
            "frames": data.frames if self.task.video else 0,
        }
        return LoaderConfig(**{**settings, **fields})  # the task's fields win (a box task turns RandAugment off)

    def loader(self, state: dict[str, Any] | None) -> ShardLoader:
        split = split_folder(self.options.data, self.options.task_config.train_split)
        return ShardLoader(split, self.loader_config(train=True), tokenizer=self.tokenizer, rank=self.place.rank,
                           world_size=self.place.world_size, state=state)

    def forward(self, batch: dict[str, Any], micro: int):
        return self.engine(to_device(batch, self.device, self.dtype), step=self.step, micro=micro)

    def tags(self) -> dict[str, str]:
        init = self.options.init
        tags = {TAG_TASK: self.task.name}
        if init is not None:
            tags[TAG_INIT] = init.uri
            if init.parent_run_id:
                tags[TAG_PARENT] = init.parent_run_id
        return tags

    def package_extra(self) -> dict[str, Any]:
        return {"task": self.task.name, "task_settings": to_dict(self.task.settings)}

    def package_files(self, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """The task's side files (`TaskModel.package_files`), written into the same atomic package."""
        return self.task.package_files(state)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        split = split_folder(self.options.data, self.options.task_config.eval_split)
        loader = ShardLoader(split, self.loader_config(train=False), tokenizer=self.tokenizer, rank=self.place.rank,
                             world_size=self.place.world_size)
        for batch in loader:
            yield to_device(batch, self.device, self.dtype)

    def evaluate(self) -> dict[str, float]:
        self.task.eval()
        context = EvalContext(self.options.output, self.place.rank, self.place.world_size)
        with torch.no_grad():
            metrics = self.task.evaluate(self.eval_batches(), context)
        self.task.train()
        return metrics

    def finish(self, tracker, package: Path | None) -> None:
        metrics = self.evaluate()
        if package is None:
            return
        tracker.log_metrics(self.step, {f"eval/{name}": float(value) for name, value in metrics.items()})
        tracker.log_model_package(package)
        version = None
        if self.options.register and getattr(tracker, "run_id", None):
            version = register_version(tracker, self.task.name, self.options.init)
        write_metrics(self.options.output, self.task, metrics, self.options, self.run_id, self.step, version)
        print_metrics(self.task, metrics)


def register_version(tracker, task: str, init: InitSource | None) -> str | None:
    """Register the run's model/ as `mplug-<task>`; the version is tagged with the parent run."""
    from mlflow import MlflowClient

    try:
        version = tracker.register_model(f"mplug-{task}")
        client = MlflowClient(tracking_uri=tracker.tracking_uri)
        if init is not None:
            client.set_model_version_tag(version.name, version.version, TAG_INIT, init.uri)
            if init.parent_run_id:
                client.set_model_version_tag(version.name, version.version, TAG_PARENT, init.parent_run_id)
        log.info("registered %s version %s", version.name, version.version)
        return f"{version.name}/{version.version}"
    except Exception as exc:  # the run and its package stay; registering can be redone from the run
        log.warning("could not register the model package as mplug-%s (%s); register runs:/%s/model later",
                    task, exc, tracker.run_id)
        return None


def write_metrics(output: Path, task: TaskModel, metrics: dict[str, float], options: FinetuneOptions,
                  run_id: str | None, step: int, registered: str | None) -> Path:
    init = options.init
    payload = {
        "task": task.name, "metric": task.metric, "value": metrics.get(task.metric),
        "baseline": metrics.get("baseline"), "eval_split": options.task_config.eval_split,
        "metrics": metrics, "run_id": run_id, "step": step, "registered": registered,
        "init": init.uri if init else None, "parent_run_id": init.parent_run_id if init else None,
    }
    path = Path(output) / METRICS_FILE
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_metrics(task: TaskModel, metrics: dict[str, float]) -> None:
    width = max(len(name) for name in metrics)
    lines = [f"{task.name} evaluation ({int(metrics.get('count', 0))} samples)"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items())]
    print("\n".join(lines), flush=True)
