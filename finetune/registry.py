"""The downstream tasks by name: `mplug finetune TASK` looks TASK up here."""

from __future__ import annotations

from importlib import import_module

from pretrain.config import ConfigError

# task name -> "module:class"; imported on use so one task's imports never slow another's start
TASKS = {
    "vqa": "finetune.tasks.vqa:VQATask",
    "caption": "finetune.tasks.caption:CaptionTask",
    "retrieval": "finetune.tasks.retrieval:RetrievalTask",
    "grounding": "finetune.tasks.grounding:GroundingTask",
    "video_qa": "finetune.tasks.video_qa:VideoQATask",
    "video_caption": "finetune.tasks.video_caption:VideoCaptionTask",
    "video_retrieval": "finetune.tasks.video_retrieval:VideoRetrievalTask",
    "action_classification": "finetune.tasks.action_classification:ActionClassificationTask",
}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module, attribute = TASKS[name].split(":")
    return getattr(import_module(module), attribute)
