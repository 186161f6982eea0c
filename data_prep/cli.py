"""`mplug data ...`: data preparation commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import train_wordpiece


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare data: tokenizers")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    tokenizer = commands.add_parser(
        "tokenizer", help="train an uncased WordPiece vocabulary from text files, one caption a line"
    )
    tokenizer.add_argument("texts", nargs="*", type=Path, help="text files with one caption per line")
    tokenizer.add_argument("--output", required=True, type=Path, help="directory BertTokenizerFast loads")
    tokenizer.add_argument("--vocab-size", type=int, default=30522)
    tokenizer.add_argument("--synthetic", type=int, default=0, metavar="N",
                           help="also train on the captions of N synthetic scenes")
    tokenizer.set_defaults(handler=run_tokenizer)


def read_lines(paths: list[Path]):
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: caption file {path} does not exist")
        with path.open(encoding="utf-8") as handle:
            yield from (line.strip() for line in handle if line.strip())


def run_tokenizer(args: argparse.Namespace) -> int:
    if not args.texts and not args.synthetic:
        raise SystemExit("error: give caption files or --synthetic N, otherwise there is nothing to train on")
    texts = list(read_lines(args.texts))
    if args.synthetic:
        texts += vocabulary_texts() + [scene.caption for scene in make_scenes(args.synthetic)]
    tokenizer = train_wordpiece(texts, args.output, args.vocab_size)
    print(f"trained a WordPiece vocabulary of {len(tokenizer)} entries from {len(texts)} texts -> {args.output}")
    return 0
