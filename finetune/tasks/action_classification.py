"""Action classification (Kinetics-400, Something-Something): the video encoder and a linear head.

    clip (B, T, 3, S, S) --video encoder--> v (B, 1 + T*N, D) --v[:, 0]--> head --> logits (B, C)

mPLUG-2 composes action classification as the video encoder plus a linear head: the head reads
the video [CLS] (the mean of the frames' [CLS], `VisionEncoder` on a clip) straight from the
video encoder, without the universal layers, the text encoder or the fusion. Training is the
cross-entropy over the C classes, with optional label smoothing.

The classes: `num_classes` from the task settings, or the length of DATA/labels.json (the class
names in index order, beside the split folders) read in `prepare_data`; a sample's class is its
KEY.json `label`. A horizontal flip mirrors "left"/"right" in a sample's texts, `label_name`
included, so a sample whose `label_name` is a known class name is given that class (the flipped
clip of "moving left" is one of "moving right").

Evaluation reports `top1` (the headline) and `top{top_k}` accuracy in percent (ties count
against the label, `finetune.metrics.topk_accuracy`), with `baseline` the share of the eval split
held by its most frequent class (the top-1 of always answering it) and `baseline_top{top_k}` the
share of its top_k most frequent classes. One clip per video is scored (the middle frame of each
segment); the multi-view testing of Kinetics papers (several clips and crops averaged) is not done.

The head's weights travel in the task's model package (TASK_WEIGHTS_FILE), and the class names as
LABELS_FILE, so `mplug predict --video` names the top classes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finetune.metrics.topk_accuracy import topk_accuracy
from finetune.tasks.base import EvalContext, TaskModel, TaskOutput
from pretrain.models.mplug import MPLUG
from pretrain.models.text import INIT_STD

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # beside the split folders, and in the task's model package
RESULTS_FILE = "classification_results.json"
PERCENT = 100.0


@dataclass
class ActionSettings:
    num_classes: int = 0  # 0: as many as DATA/labels.json names
    label_smoothing: float = 0.0
    dropout: float = 0.0  # on the video [CLS] before the head
    top_k: int = 5  # the second accuracy reported (Kinetics reports top-1 and top-5)

    def __post_init__(self) -> None:
        if self.num_classes < 0 or self.top_k < 1:
            raise ValueError(f"task.num_classes must be >= 0 (0: from labels.json) and task.top_k >= 1; got "
                             f"{self.num_classes} and {self.top_k}")
        for name in ("label_smoothing", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"task.{name} must be in [0, 1), got {getattr(self, name)}")


def read_label_names(path: Path) -> list[str]:
    """The class names of a labels.json: a non-empty JSON list of distinct strings, in index order."""
    try:
        names = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected the list of class names in index order") from None
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path} must hold a non-empty JSON list of class names (strings) in index order")
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise ValueError(f"{path} names classes more than once: {repeated[:5]}; every class needs its own name")
    return names


class ActionClassificationTask(TaskModel):
    name: ClassVar[str] = "action_classification"
    metric: ClassVar[str] = "top1"
    Settings: ClassVar[type] = ActionSettings
    video: ClassVar[bool] = True
    packaged_modules: ClassVar[tuple[str, ...]] = ("head",)

    def __init__(self, model: MPLUG, settings: ActionSettings | None, tokenizer):
        super().__init__(model, settings if settings is not None else ActionSettings(), tokenizer)
        self.dropout = nn.Dropout(self.settings.dropout)
        self.head: nn.Linear | None = None  # (D -> C), built once the number of classes is known
        self.label_names: list[str] | None = None
        if self.settings.num_classes:
            self.build_head(self.settings.num_classes)

    def build_head(self, classes: int) -> None:
        """A new linear head over `classes` classes, initialised as BERT's heads (N(0, 0.02), bias 0)."""
        width = self.model.cfg.text.width  # the vision states are projected to the text width
        parameter = next(self.model.parameters())
        self.head = nn.Linear(width, classes, device=parameter.device, dtype=parameter.dtype)
        nn.init.normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)
        self.settings.num_classes = classes  # recorded in the package's task settings

    def set_label_names(self, names: Sequence[str]) -> None:
        classes = self.settings.num_classes
        if classes and len(names) != classes:
            raise ValueError(f"{len(names)} class names for task.num_classes={classes}; set num_classes to "
                             f"{len(names)} or 0 (take it from labels.json)")
        self.label_names = list(names)
        if self.head is None:
            self.build_head(len(names))

    def prepare_data(self, data: Path, train_split: str) -> None:
        path = Path(data) / LABELS_FILE
        if path.is_file():
            self.set_label_names(read_label_names(path))
        elif self.head is None:
            raise FileNotFoundError(f"action classification needs the number of classes: set task.num_classes, or "
                                    f"put {LABELS_FILE} (the class names in index order) in {data}")
        log.info("action classification over %d classes", self.settings.num_classes)

    def package_files(self, state) -> dict[str, bytes]:
        files = super().package_files(state)
        if self.label_names is not None:
            files[LABELS_FILE] = json.dumps(self.label_names).encode()
        return files

    def load_package_files(self, directory: Path) -> None:
        super().load_package_files(directory)
        if (Path(directory) / LABELS_FILE).is_file():
            self.set_label_names(read_label_names(Path(directory) / LABELS_FILE))

    def class_name(self, index: int) -> str:
        return self.label_names[index] if self.label_names is not None else f"class {index}"

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C) of clips (B, T, 3, S, S), from the video [CLS] of the video encoder alone."""
        if self.head is None:
            raise ValueError("the classification head is not built yet: set task.num_classes or call "
                             "prepare_data(DATA, train_split) with a labels.json in DATA")
        video_cls = self.model.vision(pixels)[:, 0]  # (B, D): no universal layers on this path
        return self.head(self.dropout(video_cls))  # (B, C)

    def labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) the class of each sample: its `label_name`'s index when that is a known name, else `label`."""
        index = {name: i for i, name in enumerate(self.label_names or [])}
        classes = self.settings.num_classes
        labels = []
        for meta, key in zip(batch["meta"], batch["keys"], strict=True):
            label = index.get(meta.get("label_name"), meta.get("label"))
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                raise ValueError(f"sample {key!r} has label {meta.get('label')!r} (label_name "
                                 f"{meta.get('label_name')!r}); action classification needs an integer label in "
                                 f"[0, {classes}) in every KEY.json")
            labels.append(label)
        return torch.tensor(labels, device=batch["images"].device)

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        logits = self.logits(batch["images"])  # (B, C)
        loss = F.cross_entropy(logits.float(), self.labels(batch), label_smoothing=self.settings.label_smoothing)
        return TaskOutput(loss, {"classification": loss.detach()})

    @torch.no_grad()
    def top_classes(self, pixels: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """For each clip, its k most probable classes as (name, probability), the most probable first."""
        probabilities = self.logits(pixels).float().softmax(dim=-1)  # (B, C)
        top = probabilities.topk(min(k, probabilities.shape[1]), dim=-1)
        return [[(self.class_name(i), p) for i, p in zip(rows_i, rows_p, strict=True)]
                for rows_i, rows_p in zip(top.indices.tolist(), top.values.tolist(), strict=True)]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        was_training = self.training
        self.eval()
        scores, labels, keys = [], [], []
        try:
            for batch in batches:
                scores.append(self.logits(batch["images"]).float().cpu())
                labels.append(self.labels(batch).cpu())
                keys += list(batch["keys"])
        finally:
            self.train(was_training)
        local = (torch.cat(scores), torch.cat(labels), keys) if keys else None
        parts = [part for part in context.gather([local]) if part is not None]
        return context.on_main(lambda: self._score(parts, Path(context.output)))

    def _score(self, parts: list[tuple[torch.Tensor, torch.Tensor, list[str]]], output: Path) -> dict[str, float]:
        """The metrics of every rank's (scores (n, C), labels (n,), keys), written to RESULTS_FILE too."""
        if not parts:
            raise ValueError("the evaluation split gave no clips; check the eval data and its split name")
        scores, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        keys = [key for p in parts for key in p[2]]
        k = self.settings.top_k
        metrics = topk_accuracy(scores, labels, ks=(1, k))
        frequent = [n for _, n in Counter(labels.tolist()).most_common()]  # class sizes, largest first
        metrics["baseline"] = PERCENT * frequent[0] / len(keys)
        metrics[f"baseline_top{k}"] = PERCENT * sum(frequent[:k]) / len(keys)
        metrics["count"] = float(len(keys))
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
        output.mkdir(parents=True, exist_ok=True)
        (output / RESULTS_FILE).write_text(json.dumps(
            [{"key": key, "label": self.class_name(label), "top": [self.class_name(i) for i in ranked]}
             for key, label, ranked in zip(keys, labels.tolist(), top, strict=True)], indent=1))
        log.info("action classification top-1 %.2f, top-%d %.2f over %d clips (majority class %.2f)",
                 metrics["top1"], k, metrics[f"top{k}"], len(keys), metrics["baseline"])
        return metrics
