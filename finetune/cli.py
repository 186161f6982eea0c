"""`mplug finetune ...`: downstream tasks. No task is registered yet."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Fine-tuning commands join here as the tasks land."""
