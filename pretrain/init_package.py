"""`mplug pretrain --init PACKAGE`: pretraining that starts from a model package.

The package (a local folder: `mplug import clip|bert|official`, or a pretraining's OUTPUT/package)
gives the run
- its model config, in place of the `--config` preset's `model` section; `--set model.*` still
  applies on top, and the values that differ from the preset are logged;
- its tokenizer, unless `--tokenizer` names another;
- its weights, loaded into `MPLUGPretraining` before DeepSpeed wraps it: the online modules, the
  momentum copies when the package stores them (else copies of the online modules, as at the start
  of pretraining), and the ITC queue the package stores when its size is the run's.

MLflow URIs (`runs:/`, `models:/`) are resolved by `mplug finetune --init` (finetune/init_source.py),
a layer above this one; here they are refused with the command that downloads them. When `--resume`
finds a checkpoint the checkpoint wins: the package still shapes the model (as it did in the run
being resumed) but its weights are not read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import resolve_resume
from pretrain.config import Config, from_dict, load_config, to_dict
from pretrain.config.typed import apply_overrides
from pretrain.models.mplug import MPLUG
from pretrain.models.weights import preview, sync_momentum
from pretrain.objectives.itc import FeatureQueue
from pretrain.objectives.pretraining import MPLUGPretraining, needs_momentum
from pretrain.package import (
    CONFIG_FILE,
    MOMENTUM_PREFIX,
    TOKENIZER_FIELDS,
    PackageError,
    load_package,
    read_itc_queue,
    read_package_info,
)

log = logging.getLogger("mplug.pretrain")

TAG_INIT = "mplug.init_uri"  # the MLflow tag naming the package a run started from (fine-tuning's too)
TAG_PARENT = "mplug.parent_run_id"  # the run that produced the package, when its package.json records one
MODEL_SECTION = "model"
URI_PREFIXES = ("runs:", "models:")
DIFFERENCES_SHOWN = 12  # model values listed in the warning; the rest are counted


class InitError(ValueError):
    """The --init source is not a local model package, or its weights do not fit the run's model."""


def check_init_folder(source: str) -> Path:
    """The package folder `source` names; InitError when it is a URI or not a readable package."""
    if source.startswith(URI_PREFIXES) or "://" in source:
        raise InitError(
            f"--init {source}: mplug pretrain starts from a local model package folder; runs:/ and models:/ "
            "URIs are for `mplug finetune --init`. Download it first with `mlflow artifacts download "
            f"--artifact-uri {source} --dst-path DIR` and pass DIR/<its folder>")
    directory = Path(source)
    if not directory.is_dir():
        raise InitError(f"--init {source}: no such folder; give a model package folder (it holds package.json, "
                        "model.safetensors, config.yaml, tokenizer/), as `mplug import` or a pretraining's "
                        "OUTPUT/package writes it")
    try:
        read_package_info(directory)
    except PackageError as exc:
        raise InitError(f"--init {source}: {exc}") from None
    return directory


# ---------------------------------------------------------------------------------------------
# The run's config


def is_model_override(override: str) -> bool:
    key = override.split("=", 1)[0].strip()
    return key == MODEL_SECTION or key.startswith(MODEL_SECTION + ".")


def run_config(preset: str, overrides: Iterable[str], package: Path) -> tuple[Config, list[str]]:
    """The preset with the package's model section, every override applied; and the model values
    (dotted, "preset -> run") that differ from what the preset alone would give."""
    overrides = list(overrides)
    without_init = load_config(preset, overrides)
    package_model = to_dict(load_config(str(package / CONFIG_FILE)).model)
    model_data = apply_overrides(Config, {MODEL_SECTION: package_model},
                                 [o for o in overrides if is_model_override(o)])
    model = from_dict(Config, model_data).model
    config = dataclasses.replace(without_init, model=model)
    return config, model_differences(to_dict(without_init.model), to_dict(model))


def flatten(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_differences(preset: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """`model.KEY: preset -> run` for each differing value; the tokenizer's ids are left out (the
    tokenizer sets them in both)."""
    tokenizer_keys = {f"{MODEL_SECTION}.text.{name}" for name in TOKENIZER_FIELDS}
    before, after = flatten(preset, MODEL_SECTION + "."), flatten(run, MODEL_SECTION + ".")
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if key not in tokenizer_keys and before.get(key) != after.get(key)]


def log_differences(package: Path, preset: str, differences: list[str]) -> None:
    if not differences:
        log.info("--init %s: the package's model config is the preset %s's", package, preset)
        return
    shown = "; ".join(differences[:DIFFERENCES_SHOWN])
    more = len(differences) - DIFFERENCES_SHOWN
    log.warning("--init %s: the package's model config replaces the preset %s's; %d values differ "
                "(preset -> run): %s%s", package, preset, len(differences), shown,
                f"; and {more} more" if more > 0 else "")


def init_tags(source: str, package: Path) -> dict[str, str]:
    """The MLflow tags of a run started from the package: its source, and its producing run when known."""
    tags = {TAG_INIT: source}
    if run_id := read_package_info(package).run_id:
        tags[TAG_PARENT] = run_id
    return tags


# ---------------------------------------------------------------------------------------------
# The model


def starting_model(source: str, config: Config, *, output: Path, resume: str | None, preset: str,
                   differences: list[str], is_main: bool) -> tuple[MPLUGPretraining, dict[str, str]]:
    """The pretraining model of an --init run and its MLflow tags: the package's weights, unless
    `resume` finds a checkpoint, which wins (the package then only shapes the model, as in the run
    being resumed, and no init tag is added)."""
    package = Path(source)
    if is_main:
        log_differences(package, preset, differences)
    checkpoint = resolve_resume(output, resume)
    if checkpoint is not None:
        if is_main:
            log.warning("--init %s ignored: --resume continues from checkpoint %s, whose weights win",
                        package, checkpoint)
        return fresh_pretraining(config), {}
    return pretraining_from_package(package, config), init_tags(source, package)


def fresh_pretraining(config: Config) -> MPLUGPretraining:
    """MPLUGPretraining of `config` with random weights and no weight files read: a checkpoint fills it."""
    return MPLUGPretraining(config, model=MPLUG(config.model, momentum=needs_momentum(config)))


def pretraining_from_package(package: Path, config: Config) -> MPLUGPretraining:
    """MPLUGPretraining of `config` holding the package's weights, momentum copies and ITC queue."""
    momentum = needs_momentum(config)
    stored_momentum = momentum and read_package_info(package).momentum
    loaded = load_package(package, momentum=stored_momentum).model
    model = loaded if loaded.cfg == config.model and stored_momentum == momentum else transplant(
        loaded, config, momentum=momentum, package=package)
    if momentum and not stored_momentum:
        sync_momentum(model)
        log.info("--init %s holds no momentum copies: they start equal to the online weights", package)
    pretraining = MPLUGPretraining(config, model=model.train())
    load_queue(pretraining, package)
    return pretraining


def transplant(source: MPLUG, config: Config, *, momentum: bool, package: Path) -> MPLUG:
    """A model of the run's config holding `source`'s weights; InitError when a tensor does not fit."""
    target = MPLUG(config.model, momentum=momentum)
    state, wanted = source.state_dict(), target.state_dict()
    wrong = [f"{name} {tuple(state[name].shape)} in the package, {tuple(wanted[name].shape)} in the run"
             for name in wanted if name in state and state[name].shape != wanted[name].shape]
    missing = [name for name in wanted if name not in state and not name.startswith(MOMENTUM_PREFIX)]
    unexpected = [name for name in state if name not in wanted and not name.startswith(MOMENTUM_PREFIX)]
    if wrong or missing or unexpected:
        raise InitError(
            f"--init {package}: the package's weights do not fit the run's model: {len(wrong)} tensors differ in "
            f"shape ({preview(wrong) or 'none'}), {len(missing)} missing ({preview(missing) or 'none'}), "
            f"{len(unexpected)} unused ({preview(unexpected) or 'none'}); a --set model.* or --tokenizer that "
            "changes a size, a layer count or the vocabulary cannot start from this package")
    target.load_state_dict(state, strict=False)  # momentum copies absent from `state` are synced after
    return target


def load_queue(pretraining: MPLUGPretraining, package: Path) -> bool:
    """Put the package's ITC queue into the run's when their buffers match in name and shape."""
    stored = read_itc_queue(package)
    if stored is None:
        return False
    queue: FeatureQueue = pretraining.queue
    expected = {name: tuple(t.shape) for name, t in queue.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in stored.items()}
    if found != expected:
        log.warning("--init %s: its ITC queue %s does not fit the run's %s (model.queue_size %d, embed_dim %d); "
                    "the run starts with an empty queue", package, found, expected, queue.size,
                    pretraining.config.model.embed_dim)
        return False
    with torch.no_grad():
        queue.load_state_dict(stored)
    log.info("--init %s: ITC queue of %d slots loaded (%d filled)", package, queue.size, int(queue.filled))
    return True
