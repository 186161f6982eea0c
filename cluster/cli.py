"""The `mplug` command: gathers the sub-commands of every package's cli.py."""

from __future__ import annotations

import argparse
import logging
import sys

import data_prep.cli
import finetune.cli
import pretrain.cli
from cluster.demo import register as register_demo
from cluster.submit import register as register_submit
from pretrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mplug",
        description="mPLUG pretraining pipeline: data preparation, pretraining, fine-tuning, cluster jobs",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for package_cli in (data_prep.cli, pretrain.cli, finetune.cli):
        package_cli.register(commands)
    register_submit(commands)
    register_demo(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"mplug: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
