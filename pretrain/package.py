"""The model package: the unit that moves from pretraining to fine-tuning.

A package is a directory:

    model.safetensors   every tensor of MPLUG, momentum copies included; a tied tensor is stored
                        once, under its first state-dict name (safetensors refuses shared storage)
    config.yaml         the resolved Config, readable by `load_config(path)`
    tokenizer/          the tokenizer, as `save_pretrained` writes it
    package.json        format version, step, run id, parameter count, dtype, creation time, the
                        sha256 of model.safetensors and the tied names left out of it
    itc_queue.safetensors  optional: the ITC feature queue (FeatureQueue's buffers), e.g. of an imported
                        official retrieval checkpoint; `read_itc_queue` returns it
    *.json              optional side files such as an import report (`files=` of the exporters)

`export_package` writes one from a model, `export_state_dict` from a consolidated state dict (what a
ZeRO-3 trainer gathers on rank 0), both into a temporary sibling renamed into place, so a crash never
leaves half a package. `load_package` rebuilds the model from config.yaml alone (random
initialisation: the pretrained files the config names are not read) and loads the weights strictly.
A training run's ITC queue and optimizer state stay in DeepSpeed's checkpoints; an imported
official queue rides along as itc_queue.safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import BertTokenizerFast

from pretrain.config import Config, load_config, to_dict
from pretrain.config.schema import ModelConfig, TextConfig
from pretrain.config.tokens import with_tokenizer
from pretrain.models.mplug import MPLUG
from pretrain.models.weights import load_tokenizer, preview

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
INFO_FILE = "package.json"
PACKAGE_ENTRIES = (INFO_FILE, WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_DIR + "/")
MOMENTUM_PREFIX = "momentum."
QUEUE_FILE = "itc_queue.safetensors"
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing the weights
TOKENIZER_FIELDS = ("vocab_size", "pad_id", "cls_id", "sep_id", "mask_id")  # of TextConfig

PathLike = str | os.PathLike


class PackageError(ValueError):
    """A directory is not a readable model package, or its weights do not fit its config."""


@dataclass
class PackageInfo:
    """The contents of package.json."""

    format_version: int
    weights_sha256: str
    parameters: int  # elements stored in model.safetensors: tied tensors once, momentum copies included
    dtype: str  # of the stored tensors: "float32", "bfloat16", or several joined by "," when mixed
    momentum: bool  # whether the momentum copies are stored
    created: str  # ISO 8601, UTC
    step: int | None = None  # the optimizer step the weights are from
    run_id: str | None = None  # the training run (MLflow run id) that produced them
    tied: dict[str, str] = field(default_factory=dict)  # name left out of the file -> the stored name it shares
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedPackage:
    config: Config
    model: MPLUG  # in eval mode, on `map_location`
    tokenizer: BertTokenizerFast
    info: PackageInfo


# ---------------------------------------------------------------------------------------------
# Which tensors a package holds


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names whose tensor was already named earlier -> that first name.

    For MPLUG: the MLM and LM heads' output matrices and biases (tied to the word embeddings and to
    BERT's second bias name), in the online modules and in the momentum copies.
    """
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


@dataclass
class Layout:
    """The tensors a model built from a config holds: stored names with shapes, and tied aliases."""

    shapes: dict[str, torch.Size]  # stored name -> shape; aliases excluded
    aliases: dict[str, str]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        aliases = tied_aliases(model)
        state = model.state_dict(keep_vars=True)
        return cls({name: t.shape for name, t in state.items() if name not in aliases}, aliases)


def layout_of_config(config: Config, *, momentum: bool) -> Layout:
    """The layout of MPLUG built from `config`, on the meta device: no memory, no weights read."""
    with torch.device("meta"):
        return Layout.of(MPLUG(config.model, momentum=momentum))


def check_tensors(
    state: Mapping[str, torch.Tensor], layout: Layout, where: str, hint: str, *, allow_aliases: bool = False
) -> None:
    """Raise PackageError unless `state` holds exactly the layout's stored names, at their shapes."""
    missing = [name for name in layout.shapes if name not in state]
    allowed = set(layout.aliases) if allow_aliases else set()
    unexpected = [name for name in state if name not in layout.shapes and name not in allowed]
    if missing or unexpected:
        raise PackageError(
            f"{where}: {len(missing)} tensors missing ({preview(missing) or 'none'}) and "
            f"{len(unexpected)} unexpected ({preview(unexpected) or 'none'}); the model built from the "
            f"config holds {len(layout.shapes)} tensors (tied ones once). {hint}"
        )
    wrong = [name for name, shape in layout.shapes.items() if state[name].shape != shape]
    if wrong:
        name = wrong[0]
        raise PackageError(
            f"{where}: {name} is {tuple(state[name].shape)} but the model built from the config has "
            f"{tuple(layout.shapes[name])} ({len(wrong)} tensors differ: {preview(wrong)}). {hint}"
        )


# ---------------------------------------------------------------------------------------------
# Writing


def export_package(
    directory: PathLike,
    model: MPLUG,
    config: Config,
    tokenizer=None,
    *,
    step: int | None = None,
    run_id: str | None = None,
    extra: dict | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write `model` as a package at `directory`, replacing a package already there; returns the path.

    `files` are written beside the weights, named by their keys (an import report, the ITC queue).
    """
    if not isinstance(model, MPLUG):
        raise TypeError(f"export_package takes the MPLUG model, got {type(model).__name__}; for a "
                        "wrapper such as MPLUGPretraining pass its `.model`")
    if model.cfg != config.model:
        raise PackageError("the model was built from a different model config than `config.model`; pass "
                           "the Config the model was built from, so the package rebuilds the same model")
    return export_state_dict(directory, model.state_dict(), config, tokenizer,
                             step=step, run_id=run_id, extra=extra, files=files)


def export_state_dict(
    directory: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    tokenizer=None,
    *,
    step: int | None = None,
    run_id: str | None = None,
    extra: dict | None = None,
    prefix: str = "",
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a consolidated MPLUG state dict as a package at `directory`; returns the path.

    `state_dict` holds every tensor of MPLUG, with or without all the momentum copies; tied names may
    appear (as one tensor or as equal copies) or be left out. With `prefix` (e.g. "model." for
    MPLUGPretraining's state dict) only the keys under it are taken, without it; the others (the ITC
    queue) are training state and are dropped. The tokenizer defaults to `config.model.text.tokenizer`.
    """
    state = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    dropped = [key for key in state_dict if not key.startswith(prefix)]
    if dropped:
        log.info("package: %d tensors outside %r left out as training state: %s",
                 len(dropped), prefix, preview(dropped))
    momentum = any(key.startswith(MOMENTUM_PREFIX) for key in state)
    layout = layout_of_config(config, momentum=momentum)
    check_tensors(state, layout, "state dict to export", hint=(
        "Pass the full state dict of the MPLUG built from `config` (under ZeRO-3, the one gathered on "
        "rank 0, momentum copies included or all left out); for a wrapper's state dict set "
        "prefix='model.'"), allow_aliases=True)
    for alias, canonical in layout.aliases.items():
        if alias in state and state[alias] is not state[canonical] and not torch.equal(
            state[alias].cpu(), state[canonical].cpu()
        ):
            raise PackageError(f"state dict to export: {alias} and {canonical} are tied in the model "
                               "but differ here; the state dict was not taken from one model")
    tensors = {name: state[name].detach().cpu().contiguous() for name in layout.shapes}
    side_files = dict(files or {})
    reserved = {INFO_FILE, WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_DIR}
    clashing = [name for name in side_files if name in reserved or "/" in name or name.startswith(".")]
    if clashing:
        raise PackageError(f"side files {clashing} would replace a part of the package or leave it; name them "
                           f"with a plain file name other than {', '.join(sorted(reserved))}")

    tokenizer = resolve_tokenizer(tokenizer, config.model.text)
    info_fields = {"step": step, "run_id": run_id, "extra": dict(extra or {})}
    try:
        json.dumps(info_fields)
    except TypeError as exc:
        raise TypeError(f"package.json must be plain JSON: step, run_id and extra hold {exc}") from exc

    def write(staging: Path) -> None:
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        info = PackageInfo(
            format_version=FORMAT_VERSION,
            weights_sha256=sha256_of(staging / WEIGHTS_FILE),
            parameters=sum(t.numel() for t in tensors.values()),
            dtype=",".join(dtypes),
            momentum=momentum,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tied=dict(layout.aliases),
            **info_fields,
        )
        (staging / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
        for name, content in side_files.items():
            (staging / name).write_bytes(content)

    path = write_atomically(Path(directory), write)
    log.info("model package written to %s (%d tensors, step %s)", path, len(tensors), step)
    return path


def resolve_tokenizer(tokenizer, text: TextConfig):
    """The tokenizer to package: the one given, else the config's; its ids must be the model's."""
    if tokenizer is None:
        if text.tokenizer is None:
            raise PackageError("a package needs a tokenizer: pass `tokenizer`, or set model.text.tokenizer "
                               "to a local tokenizer directory")
        tokenizer = load_tokenizer(text.tokenizer)
    fitted = with_tokenizer(Config(model=ModelConfig(text=text)), tokenizer).model.text
    wrong = [f"{name}={getattr(text, name)} but the tokenizer's is {getattr(fitted, name)}"
             for name in TOKENIZER_FIELDS if getattr(fitted, name) != getattr(text, name)]
    if wrong:
        raise PackageError(f"the tokenizer does not fit model.text: {'; '.join(wrong)}; build the config "
                           "with pretrain.config.tokens.with_tokenizer")
    return tokenizer


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run `write` on a temporary sibling of `directory`, then swap it into place.

    An existing package is moved aside, the new one renamed in, and the old one deleted; a crash
    leaves either package whole (the old one possibly under a hidden `.NAME.*.old` sibling). A
    directory that holds something other than a package is never replaced.
    """
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} is a file; a model package is a directory")
        if any(directory.iterdir()) and not (directory / INFO_FILE).is_file():
            raise FileExistsError(f"{directory} holds files but no {INFO_FILE}, so it is not a model "
                                  "package and is not overwritten; choose an empty or new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()  # not mkdtemp: its mode 0700 would hide the package from other users
    try:
        write(staging)
        sync_tree(staging)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
            os.rename(directory, old)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return directory


def sync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, so the rename never publishes unwritten data."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Reading


def read_package_info(directory: PathLike) -> PackageInfo:
    """package.json of the package at `directory`, after checking that every part is there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model package {directory} does not exist or is not a directory")
    missing = [entry for entry in PACKAGE_ENTRIES if not (directory / entry).exists()]
    if missing:
        raise PackageError(
            f"{directory} is not a model package: it lacks {', '.join(missing)}. A package holds "
            f"{', '.join(PACKAGE_ENTRIES)}, as pretrain.package.export_package writes them"
        )
    try:
        data = json.loads((directory / INFO_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise PackageError(f"{directory / INFO_FILE} is not valid JSON ({exc})") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise PackageError(
            f"{directory / INFO_FILE} has format_version {version!r}; this code reads format version "
            f"{', '.join(map(str, READABLE_VERSIONS))}: re-export the package or use the code that wrote it"
        )
    try:
        return PackageInfo(**data)
    except TypeError as exc:
        raise PackageError(f"{directory / INFO_FILE} does not have the fields of format version "
                           f"{version} ({exc})") from exc


def read_itc_queue(directory: PathLike) -> dict[str, torch.Tensor] | None:
    """The ITC queue stored in a package (FeatureQueue's buffers by name), or None when it holds none."""
    path = Path(directory) / QUEUE_FILE
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def load_package(
    directory: PathLike, *, map_location: str | torch.device = "cpu", momentum: bool = True, verify: bool = True
) -> LoadedPackage:
    """The config, model, tokenizer and info of the package at `directory`; nothing is downloaded.

    The model is built from config.yaml with random initialisation (the vision and text weight files
    the config names are not read), then every stored tensor is loaded strictly. With
    `momentum=False` the model has no momentum copies and the stored ones are skipped. `verify`
    checks the weights file against its sha256 in package.json first.
    """
    directory = Path(directory)
    info = read_package_info(directory)
    weights = directory / WEIGHTS_FILE
    if momentum and not info.momentum:
        raise PackageError(f"{directory} was exported without momentum copies; load it with "
                           "momentum=False, or export a model built with momentum=True")
    if verify and (digest := sha256_of(weights)) != info.weights_sha256:
        raise PackageError(f"{weights} has sha256 {digest} but {INFO_FILE} records {info.weights_sha256}: "
                           "the file was changed or copied incompletely; copy the package again")
    config = load_config(str(directory / CONFIG_FILE))
    model = MPLUG(config.model, momentum=momentum)
    layout = Layout.of(model)
    with safe_open(weights, framework="pt") as f:  # reads only the tensors wanted
        stored = {name: f.get_tensor(name) for name in f.keys()
                  if momentum or not name.startswith(MOMENTUM_PREFIX)}
    check_tensors(stored, layout, str(weights), hint=(
        f"The weights file does not fit {CONFIG_FILE}: re-export the package from the trained model"))
    full = {**stored, **{alias: stored[canonical] for alias, canonical in layout.aliases.items()}}
    model.load_state_dict(full, strict=True)
    model.to(map_location).eval()
    log.info("model package %s loaded: step %s, %d tensors%s", directory, info.step, len(stored),
             "" if momentum else ", momentum copies skipped")
    return LoadedPackage(config=config, model=model, tokenizer=load_tokenizer(directory / TOKENIZER_DIR),
                         info=info)
