"""`mplug model ...`: inspecting model presets."""

from __future__ import annotations

import argparse
import json

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


def run_summary(args: argparse.Namespace) -> int:
    result = summarize(load_config(args.name, args.overrides))
    if args.json:
        payload = result.to_dict()
        print(json.dumps(payload, indent=2))
    else:
        print(format_summary(result))
    return 0
