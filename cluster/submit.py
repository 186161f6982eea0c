"""`mplug submit {slurm,ray} ... -- COMMAND...`: run any `mplug` command as a cluster job.

The command after `--` is what every rank (Slurm) or the job's driver (Ray) runs; it reads its
place in the job from the environment, so the same command runs on one machine, under Slurm or
on Ray.
"""

from __future__ import annotations

import argparse

from cluster import ray_jobs, slurm


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit", help="run a command as a Slurm or Ray job",
        description="Submit `COMMAND...` (after `--`) to a Slurm cluster (sbatch) or a Ray cluster (Ray Jobs).")
    targets = submit.add_subparsers(dest="target", required=True, metavar="TARGET")
    slurm.register(targets)
    ray_jobs.register(targets)


def command_after_dashes(parser: argparse.ArgumentParser, command: list[str]) -> list[str]:
    """The words after `--` (argparse.REMAINDER keeps the `--` itself); an error when there are none."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command to run: put it after `--`, e.g. `-- mplug pretrain --config base ...`")
    return command
