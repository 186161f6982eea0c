"""`mplug import official`: an official mPLUG checkpoint as a model package.

The tensors are mapped by `pretrain.official_checkpoint`; this adds what only fine-tuning knows: an
official VQA, caption or retrieval checkpoint becomes a *task* package (package.json `extra.task` and
`extra.task_settings`, as `mplug finetune` writes them), so `mplug predict` and `mplug finetune --init`
load it as that task. The settings are the official recipe's where they differ from this project's
defaults (the official caption model reads no prompt); a pretraining checkpoint stays a plain package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"


def official_task_settings(official_model: str):
    """The task settings of the official recipe, or None for a pretraining checkpoint."""
    from finetune.tasks.caption import CaptionSettings
    from finetune.tasks.retrieval import RetrievalSettings
    from finetune.tasks.vqa import VQASettings
    from pretrain.official_checkpoint import CAPTION, PRETRAINING, RETRIEVAL, VQA

    recipes = {
        PRETRAINING: None,
        VQA: VQASettings(),  # vqa_mplug.py: beam 5, answers of 1 to 10 tokens
        CAPTION: CaptionSettings(prompt="", min_length=8, max_length=25),  # caption_mplug_*.yaml: prompt ''
        RETRIEVAL: RetrievalSettings(k_test=256),  # retrieval_*_mplug_large.yaml
    }
    return recipes[official_model]


def task_extra(official_model: str) -> dict:
    """package.json `extra` for the official model: its task and settings (none for pretraining)."""
    from pretrain.config import to_dict

    settings = official_task_settings(official_model)
    if settings is None:
        return {}
    return {"task": official_model, "task_settings": to_dict(settings)}


def import_official(
    checkpoint: Path, config_name: str, output: Path, tokenizer_dir: str | None, *,
    task: str = AUTO, overrides: list[str] | None = None, seed: int = 0,
) -> Path:
    """Convert `checkpoint` for the `config_name` preset (base or large) and write the package at `output`."""
    from pretrain.config import load_config
    from pretrain.config.tokens import with_tokenizer
    from pretrain.models.weights import load_tokenizer
    from pretrain.official_checkpoint import (
        convert_official,
        read_official_checkpoint,
        write_official_package,
    )

    config = load_config(config_name, overrides or [])
    tokenizer_dir = tokenizer_dir or config.model.text.tokenizer
    if not tokenizer_dir:
        raise ValueError("a package needs a tokenizer: give --tokenizer DIR, a BERT WordPiece directory (the official "
                         "models use bert-base-uncased's vocab.txt, 30522 tokens)")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = with_tokenizer(config, tokenizer)
    state = read_official_checkpoint(checkpoint)
    converted = convert_official(state, config, config_name=config_name, model=None if task == AUTO else task)
    return write_official_package(converted, output, tokenizer, source=str(checkpoint),
                                  extra=task_extra(converted.model), seed=seed)


def register(import_commands: argparse._SubParsersAction) -> None:
    """Add `official` to the sub-commands of `mplug import`."""
    from pretrain.official_checkpoint import OFFICIAL_MODELS

    official = import_commands.add_parser(
        "official", help="an official mPLUG checkpoint (.pth) as a model package (a task package for VQA, caption, "
                         "retrieval)",
        description="Maps every tensor of an official X-PLUG/mPLUG checkpoint onto this model, drops the ones the "
                    "official forward never runs (listed with their reasons in OUTPUT/import_report.json) and "
                    "writes a model package that `mplug predict` and `mplug finetune --init` load.",
    )
    official.add_argument("checkpoint", type=Path, help="mplug_base.pth, mplug_large_v2.pth, a fine-tuned .pth, ...")
    official.add_argument("--config", required=True, help="base (ViT-B/16 checkpoints) or large (ViT-L/14)")
    official.add_argument("--output", required=True, type=Path, help="the package folder to write")
    official.add_argument("--tokenizer", help="BERT tokenizer folder (vocab.txt of bert-base-uncased); default: "
                                              "model.text.tokenizer of the config")
    official.add_argument("--task", default=AUTO, choices=(AUTO, *OFFICIAL_MODELS),
                          help="which official model wrote the checkpoint (default: told from its modules; "
                               "'caption' for a checkpoint of the caption model with momentum copies)")
    official.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value (repeatable)")
    official.add_argument("--seed", type=int, default=0, help="initialises the tensors the checkpoint lacks")
    official.set_defaults(handler=run_import_official)


def run_import_official(args: argparse.Namespace) -> int:
    from pretrain.official_checkpoint import OfficialCheckpointError

    try:
        path = import_official(args.checkpoint, args.config, args.output, args.tokenizer, task=args.task,
                               overrides=args.overrides, seed=args.seed)
    except (OfficialCheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"mplug import official: {exc}", file=sys.stderr)
        return 2
    print(f"model package written to {path} (report: {path / 'import_report.json'})")
    return 0
