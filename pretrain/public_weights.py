"""`mplug import clip` and `mplug import bert`: public initialisations as a model package.

A new package is built from a config (every tensor as initialised), or an existing package is taken
as the start; then the CLIP ViT goes into the vision tower (OpenAI TorchScript `.pt` / `.tar`, timm or
open_clip layouts, position embeddings resized to the config's grid) or the BERT directory into the
text encoder, fusion, decoder and MLM heads (`pretrain.models.weights` does the mapping). The momentum
copies are set equal to the online modules, as at the start of pretraining. Two imports in a row
(`clip`, then `bert --package` of the first's output) give a package with both parts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pretrain.config import Config
from pretrain.models.mplug import MPLUG
from pretrain.models.weights import (
    PathLike,
    load_bert_weights,
    load_vision_weights,
    sync_momentum,
)
from pretrain.package import export_package, load_package

log = logging.getLogger(__name__)

CLIP, BERT = "clip", "bert"


def starting_model(config: Config | None, package: PathLike | None, seed: int) -> tuple[MPLUG, Config, dict, object]:
    """The model to import into, its config, package extra and tokenizer: the package's when one is
    given, else a new model of `config` (seeded with `seed`) and no tokenizer."""
    if package is not None:
        loaded = load_package(package, momentum=True)
        return loaded.model, loaded.config, dict(loaded.info.extra), loaded.tokenizer
    if config is None:
        raise ValueError("give a config to build a new model from, or a package to import into")
    torch.manual_seed(seed)
    return MPLUG(config.model, momentum=True), config, {}, None


def import_part(
    part: str, source: PathLike, output: PathLike, tokenizer=None, *,
    config: Config | None = None, package: PathLike | None = None, seed: int = 0,
) -> Path:
    """Load the CLIP ViT (`part="clip"`) or BERT (`"bert"`) at `source` into a model and package it.

    The model is the one of `package` when given (its tokenizer unless `tokenizer` is), else a new one
    of `config`, which must already be fitted to `tokenizer` (`pretrain.config.tokens.with_tokenizer`).
    """
    model, config, extra, package_tokenizer = starting_model(config, package, seed)
    tokenizer = tokenizer if tokenizer is not None else package_tokenizer
    with torch.no_grad():
        if part == CLIP:
            loaded = load_vision_weights(model.vision, source)
            what = {"layout": loaded.layout, "dropped": len(loaded.dropped)}
        elif part == BERT:
            report = load_bert_weights(model, source)
            what = {"copied": len(report.copied), "new": len(report.new), "unused": len(report.unused)}
        else:
            raise ValueError(f"unknown part {part!r}; import 'clip' or 'bert'")
        sync_momentum(model)
    initialised = dict(extra.get("initialised_from", {}))
    initialised[part] = {"source": str(source), **what}
    log.info("%s weights from %s imported (%s)", part, source, what)
    return export_package(output, model.eval(), config, tokenizer, extra={**extra, "initialised_from": initialised})
