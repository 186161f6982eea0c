"""One rank of `mplug finetune`: resolve the init source, build the task model, train, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from finetune.config import load_finetune_config, run_config
from finetune.init_source import InitSource, InitSourceError, resolve_init
from finetune.registry import task_class
from finetune.tasks.base import TaskModel

log = logging.getLogger("mplug.finetune")
INIT_DIR = "init"  # under the output folder: the downloaded init package


def build_task(init: InitSource, task_cls: type, finetune: Any) -> tuple[TaskModel, Any]:
    """The task model around the init package's MPLUG at the task resolution, and the run's model config."""
    from finetune.resolution import at_resolution
    from pretrain.package import load_package, read_package_info

    momentum = task_cls.uses_momentum and read_package_info(init.directory).momentum
    package = load_package(init.directory, momentum=momentum)
    config = run_config(package.config, finetune)
    model = at_resolution(package.model, config)
    model.train()
    task = task_cls(model, finetune.task, package.tokenizer)
    return task, task.model_config(config)


def resolve_on_rank_zero(source: str, output: Path) -> InitSource:
    """Rank 0 resolves (and downloads) the source once; every rank gets its result, or its error.

    The other ranks then read the folder rank 0 downloaded into (the output is shared).
    """
    import torch.distributed as dist

    outcome: InitSource | str | None = None
    if dist.get_rank() == 0:
        try:
            outcome = resolve_init(source, output / INIT_DIR)
        except InitSourceError as exc:
            outcome = str(exc)  # sent to every rank, so none waits for a download that never comes
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise InitSourceError(box[0])
    return box[0]


def finetune_this_rank(args: argparse.Namespace) -> int:
    from pretrain.launch import (
        init_distributed,
        place_from_environment,
        use_cpu_accelerator_without_gpu,
    )

    use_cpu_accelerator_without_gpu()
    from finetune.trainer import FinetuneOptions, FinetuneTrainer, steps_for_epochs

    task_cls = task_class(args.task)
    finetune = load_finetune_config(task_cls, args.preset, args.overrides)
    place = place_from_environment()
    init_distributed(place)
    try:
        init = resolve_on_rank_zero(args.init, args.output)
    except InitSourceError as exc:
        print(f"mplug finetune: {exc}", file=sys.stderr)
        return 2
    task, config = build_task(init, task_cls, finetune)
    global_batch = config.train.batch_size * config.train.grad_accumulation * place.world_size
    max_steps = 0 if args.eval_only else (
        args.max_steps or steps_for_epochs(args.data, finetune.train_split, finetune.epochs, global_batch))
    if max_steps > 0:  # the warmup-cosine schedule spans this run's steps, not the preset's train.max_steps
        train = config.train
        config = dataclasses.replace(config, train=dataclasses.replace(
            train, max_steps=max_steps, warmup_steps=min(train.warmup_steps, max_steps)))
    options = FinetuneOptions(
        data=args.data, output=args.output, max_steps=max_steps, resume=args.resume,
        config_name=f"{task_cls.name}/{args.preset or task_cls.name}", task_config=finetune, init=init,
        eval_batch_size=args.eval_batch_size, register=not args.no_register and not args.eval_only)
    if place.is_main:
        log.info("fine-tuning %s from %s (parent run %s) for %d steps at %d pixels", task_cls.name, init.uri,
                 init.parent_run_id or "unknown", max_steps, config.model.vision.image_size)
    return FinetuneTrainer(config, options, place, task.tokenizer, task).run()
