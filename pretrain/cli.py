"""`mplug model ...` (inspecting presets), `mplug pretrain` (training, memory estimates), `mplug import
clip|bert` (public initialisations into a package; finetune adds `mplug import official`) and
`mplug export` (a package in timm / transformers / plain safetensors layouts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.config import load_config, preset_names
from pretrain.models.summary import format_summary, summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect model presets")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    summary = model_commands.add_parser(
        "summary",
        help="parameters per module and the fusion pattern, built on the meta device (no memory)",
    )
    summary.add_argument("name", help=f"a preset ({', '.join(preset_names())}) or a YAML config file")
    summary.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set model.fusion.stride=3 (repeatable)")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(handler=run_summary)
    register_pretrain(subparsers)
    register_import(import_subcommands(subparsers))
    register_export(subparsers)


IMPORT_COMMAND = "import"
IMPORT_SUBCOMMANDS = "import_subcommands"  # the attribute of the `import` parser holding its sub-commands


def import_subcommands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of `mplug import`, created on first use; finetune adds `official` to them."""
    if IMPORT_COMMAND not in subparsers.choices:
        parser = subparsers.add_parser(
            IMPORT_COMMAND, help="bring weights in as a model package: official mPLUG checkpoints, CLIP, BERT")
        setattr(parser, IMPORT_SUBCOMMANDS, parser.add_subparsers(dest="import_command", required=True,
                                                                  metavar="SOURCE"))
    return getattr(subparsers.choices[IMPORT_COMMAND], IMPORT_SUBCOMMANDS)


def register_import(commands: argparse._SubParsersAction) -> None:
    sources = {
        "clip": ("FILE", "a CLIP ViT (OpenAI TorchScript .pt/.tar, timm or open_clip state dict) into the vision tower"),
        "bert": ("DIR", "a Hugging Face BERT folder into the text encoder, fusion, decoder and MLM heads"),
    }
    for name, (metavar, text) in sources.items():
        command = commands.add_parser(name, help=text, description=text + (
            ", in a new package of --config (or into the package --package); the momentum copies are set to the "
            "online weights. Nothing is downloaded."))
        command.add_argument("source", metavar=metavar, type=Path)
        start = command.add_mutually_exclusive_group(required=True)
        start.add_argument("--config", help=f"a preset ({', '.join(preset_names())}) or YAML file for a new model")
        start.add_argument("--package", type=Path, help="an existing package to import into (its config is kept)")
        command.add_argument("--output", required=True, type=Path, help="the package folder to write")
        command.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the package's, the BERT "
                                                           "folder's vocabulary, or model.text.tokenizer)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value of a new model, e.g. --set model.vision.image_size=384")
        command.add_argument("--seed", type=int, default=0, help="initialises the parts not imported")
        command.set_defaults(handler=run_import_part, part=name)


def register_export(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="a model package as plain safetensors, or as timm + transformers folders (--format hf)",
        description="safetensors: OUTPUT/model.safetensors + config.json + tokenizer/. hf: OUTPUT/vision (timm "
                    "'local-dir:' model), OUTPUT/text_encoder (BertModel), OUTPUT/decoder (BertLMHeadModel), "
                    "OUTPUT/mplug.safetensors (fusion and heads). Momentum copies are left out.")
    export.add_argument("package", type=Path, help="a model package folder")
    export.add_argument("--format", required=True, choices=("safetensors", "hf"))
    export.add_argument("--output", required=True, type=Path, help="a new or empty folder")
    export.set_defaults(handler=run_export)


def register_pretrain(subparsers: argparse._SubParsersAction) -> None:
    pretrain = subparsers.add_parser(
        "pretrain", help="pretrain with DeepSpeed ZeRO on shards (or estimate its memory per rank)",
        description="Runs as one rank of a job: the rank comes from torchrun / deepspeed / srun / Ray Train "
                    "variables, or --nproc-per-node starts N local ranks.",
    )
    pretrain.add_argument("--config", required=True, help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    pretrain.add_argument("--data", help="shards: a manifest, folder, glob or brace pattern, or a mixture YAML")
    pretrain.add_argument("--video-data", help="video shards (same forms as --data): every step also trains on a "
                               "batch of clips (mPLUG-2 configs; data.frames frames per clip)")
    pretrain.add_argument("--output", type=Path, help="checkpoints, model package, MLflow store (when local)")
    pretrain.add_argument("--max-steps", type=int, help="optimizer steps (default: train.max_steps)")
    pretrain.add_argument("--nproc-per-node", type=int, help="start this many local ranks (torchrun)")
    pretrain.add_argument("--resume", help="'auto' (the newest complete checkpoint under --output, if any) or a path")
    pretrain.add_argument("--init", metavar="PACKAGE",
                          help="start from a local model package folder (`mplug import`, a pretraining's "
                               "OUTPUT/package): its model config replaces the preset's model section (--set "
                               "model.* still applies), its weights, momentum copies, ITC queue and tokenizer are "
                               "used; ignored when --resume finds a checkpoint")
    pretrain.add_argument("--tokenizer", type=Path,
                          help="tokenizer folder (default: the --init package's, else model.text.tokenizer; make "
                               "one with `mplug data tokenizer`)")
    pretrain.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s for MFU where it is not known")
    pretrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set train.zero_stage=3 (repeatable)")
    pretrain.add_argument("--estimate-memory", action="store_true",
                          help="print per-rank memory of parameters, gradients, optimizer states and activations")
    pretrain.add_argument("--world-size", type=int, default=1, help="ranks, for --estimate-memory")
    pretrain.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="for --estimate-memory")
    pretrain.set_defaults(handler=run_pretrain)


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    """The arguments each local rank gets: the same run, without --nproc-per-node."""
    argv = ["pretrain", "--config", args.config, "--data", args.data, "--output", str(args.output)]
    for flag, value in (("--video-data", args.video_data), ("--max-steps", args.max_steps),
                        ("--resume", args.resume), ("--init", args.init),
                        ("--tokenizer", args.tokenizer), ("--peak-flops", args.peak_flops)):
        if value is not None:
            argv += [flag, str(value)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def run_pretrain(args: argparse.Namespace) -> int:
    differences: list[str] = []  # the model values an --init package changes from the preset
    if args.init is None:
        config = load_config(args.config, args.overrides)
    else:
        from pretrain.init_package import InitError, check_init_folder, run_config

        try:
            config, differences = run_config(args.config, args.overrides, check_init_folder(args.init))
        except InitError as exc:
            print(f"mplug pretrain: {exc}", file=sys.stderr)
            return 2
    if args.estimate_memory:
        from pretrain.memory_estimate import estimate_memory, format_memory_estimate

        print(format_memory_estimate(estimate_memory(config, world_size=args.world_size, zero_stage=args.zero_stage)))
        return 0
    if not args.data or not args.output:
        raise SystemExit("error: mplug pretrain needs --data and --output (or --estimate-memory)")
    if args.video_data and not config.model.video.temporal:
        print(f"mplug pretrain: --video-data needs a video model, but {args.config} has no temporal modules "
              "(model.video.temporal is false); use an mPLUG-2 config (mplug2_tiny, mplug2_base, mplug2_large)",
              file=sys.stderr)
        return 2
    if args.nproc_per_node:
        from pretrain.launch import launch_local

        return launch_local(args.nproc_per_node, "pretrain.cli", forwarded_arguments(args))
    return train_this_rank(args, config, differences)


def train_this_rank(args: argparse.Namespace, config, differences: list[str]) -> int:
    from pretrain.config.tokens import with_tokenizer
    from pretrain.launch import (
        init_distributed,
        place_from_environment,
        use_cpu_accelerator_without_gpu,
    )

    use_cpu_accelerator_without_gpu()
    from pretrain.models.weights import load_tokenizer
    from pretrain.package import TOKENIZER_DIR
    from pretrain.trainer import RunOptions, Trainer

    package = Path(args.init) if args.init is not None else None  # checked by run_pretrain
    tokenizer_dir = args.tokenizer or (package / TOKENIZER_DIR if package else config.model.text.tokenizer)
    if not tokenizer_dir:
        raise SystemExit("error: no tokenizer: give --tokenizer DIR or set model.text.tokenizer; "
                         "`mplug data tokenizer --shards SPEC --output DIR` trains one from the shards' captions")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = with_tokenizer(config, tokenizer)
    place = place_from_environment()
    init_distributed(place)
    max_steps = config.train.max_steps if args.max_steps is None else args.max_steps  # 0: a package of the init
    options = RunOptions(data=args.data, output=args.output, max_steps=max_steps, resume=args.resume,
                         config_name=args.config, peak_flops=args.peak_flops, video_data=args.video_data)
    model = None
    if package is not None:
        from pretrain.init_package import InitError, starting_model

        try:
            model, options.tags = starting_model(args.init, config, output=args.output, resume=args.resume,
                                                 preset=args.config, differences=differences, is_main=place.is_main)
        except InitError as exc:
            raise SystemExit(f"mplug pretrain: {exc}") from None
    return Trainer(config, options, place, tokenizer, model=model).run()


def run_import_part(args: argparse.Namespace) -> int:
    from pretrain.config.tokens import with_tokenizer
    from pretrain.models.weights import TOKENIZER_FILES, load_tokenizer
    from pretrain.public_weights import import_part

    config, tokenizer_dir = None, args.tokenizer
    if args.config:
        config = load_config(args.config, args.overrides)
        if tokenizer_dir is None and args.part == "bert" and any((args.source / f).is_file() for f in TOKENIZER_FILES):
            tokenizer_dir = args.source  # a BERT folder carries its vocabulary
        tokenizer_dir = tokenizer_dir or config.model.text.tokenizer
        if not tokenizer_dir:
            raise SystemExit("error: a new package needs a tokenizer: give --tokenizer DIR or set model.text.tokenizer")
    elif args.overrides:
        raise SystemExit("error: --set changes the config of a new model; with --package the package's config is kept")
    try:
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        if config is not None:
            config = with_tokenizer(config, tokenizer)
        path = import_part(args.part, args.source, args.output, tokenizer, config=config, package=args.package,
                           seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mplug import {args.part}: {exc}", file=sys.stderr)
        return 2
    print(f"model package written to {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pretrain.export import export_package_as

    try:
        path = export_package_as(args.package, args.output, args.format)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"mplug export: {exc}", file=sys.stderr)
        return 2
    print(f"{args.package} exported as {args.format} to {path}")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    result = summarize(load_config(args.name, args.overrides))
    if args.json:
        payload = result.to_dict()
        print(json.dumps(payload, indent=2))
    else:
        print(format_summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.cli pretrain ...`: what each local rank of --nproc-per-node runs."""
    import logging

    parser = argparse.ArgumentParser(prog="mplug")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
