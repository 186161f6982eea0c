"""The batch script of `mplug submit slurm`: a pure function of a `SlurmJob` (what to ask Slurm for,
what to run) to the text that `sbatch` reads.

The script, top to bottom:
1. `#SBATCH` lines: nodes, tasks per node (one per GPU), GPUs, CPUs, partition, account, time
   limit, the log (`--open-mode=append`, so a requeued run appends), `--requeue`, and
   `--signal=B:USR1@S`: Slurm's warning S seconds before the time limit, sent to the batch shell;
2. the environment activation (the prefix `mplug` runs from, or the given lines);
3. the rank wiring: MASTER_ADDR is the first host of the job's node list, MASTER_PORT comes from
   the job id; `srun` starts every task, and each one exports RANK / WORLD_SIZE / LOCAL_RANK from
   SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID before it becomes the command;
4. preemption: on USR1 the batch shell forwards the signal to `srun` (which passes it to every
   task), waits for the tasks to checkpoint and exit, then `scontrol requeue`s the job. The next
   run of the job (SLURM_RESTART_COUNT > 0) runs the same command, which resumes with
   `--resume auto`: `training_command_that_resumes` adds it to `mplug pretrain` / `finetune`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_JOB_NAME = "mplug"
DEFAULT_SIGNAL_BEFORE_S = 300  # Slurm may send it up to a minute early; checkpointing must fit in
MAX_SIGNAL_BEFORE_S = 65535  # sbatch's limit for the time in --signal=SIG@TIME
PREEMPTION_SIGNAL = "USR1"  # pretrain.trainer stops cleanly on SIGUSR1 (and SIGTERM)
# MASTER_PORT = BASE + job id % SPAN: above Ray's worker ports (10002-19999), below Linux's ephemeral ones (32768+)
MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 10000
MAX_PORT = 65535
RESUME_AUTO = ("--resume", "auto")
TRAINING_COMMANDS = ("pretrain", "finetune")
NOT_TRAINING_FLAGS = ("--estimate-memory", "--eval-only")  # commands that do not train: nothing to resume
TASK_PROGRAM_NAME = "mplug-task"  # $0 of each task's `bash -c`
JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
SBATCH_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9-]*$")

# sbatch options the job spec writes itself, by every name sbatch knows them: what to do instead
MANAGED_SBATCH_OPTIONS = {
    **dict.fromkeys(("job-name", "J"), "use --job-name"),
    **dict.fromkeys(("nodes", "N"), "use --nodes"),
    **dict.fromkeys(("ntasks-per-node", "tasks-per-node"), "use --ntasks-per-node"),
    "gpus-per-node": "use --gpus-per-node",
    **dict.fromkeys(("cpus-per-task", "c"), "use --cpus-per-task"),
    **dict.fromkeys(("partition", "p"), "use --partition"),
    **dict.fromkeys(("account", "A"), "use --account"),
    **dict.fromkeys(("time", "t"), "use --time"),
    **dict.fromkeys(("output", "o"), "use --log-dir"),
    "open-mode": "the log is always appended to, so that a requeued run continues it",
    **dict.fromkeys(("requeue", "no-requeue"), "the job always requeues itself on preemption"),
    "signal": "use --signal-before",
}


class JobSpecError(ValueError):
    """A job that cannot be written as a batch script; the message says what to change."""


@dataclass(frozen=True)
class SlurmJob:
    """What `mplug submit slurm` asks Slurm for and runs on every task."""

    command: tuple[str, ...]
    log_dir: Path
    env_setup: tuple[str, ...]  # shell lines that make `mplug` (and the command) available
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # None: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    job_name: str = DEFAULT_JOB_NAME
    master_port: int | None = None  # None: derived from the job id
    signal_before_s: int = DEFAULT_SIGNAL_BEFORE_S
    sbatch_options: tuple[tuple[str, str | None], ...] = field(default_factory=tuple)  # (key, value or None)

    def __post_init__(self) -> None:
        check_job(self)

    @property
    def tasks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def log_path(self) -> str:
        """The log file as sbatch's --output pattern (%j: the job id)."""
        return str(self.log_dir / f"{self.job_name}-%j.out")

    def log_file(self, job_id: str) -> Path:
        return self.log_dir / f"{self.job_name}-{job_id}.out"


def check_job(job: SlurmJob) -> None:
    if not job.command:
        raise JobSpecError("no command to run: put it after `--`")
    for name, value, least in (("--nodes", job.nodes, 1), ("--gpus-per-node", job.gpus_per_node, 0),
                               ("--ntasks-per-node", job.ntasks_per_node, 1),
                               ("--cpus-per-task", job.cpus_per_task, 1)):
        if value is not None and value < least:
            raise JobSpecError(f"{name} must be at least {least}, got {value}")
    if not 1 <= job.signal_before_s <= MAX_SIGNAL_BEFORE_S:
        raise JobSpecError(f"--signal-before must be 1..{MAX_SIGNAL_BEFORE_S} seconds, got {job.signal_before_s}")
    if job.master_port is not None and not 1 <= job.master_port <= MAX_PORT:
        raise JobSpecError(f"--master-port must be 1..{MAX_PORT}, got {job.master_port}")
    if not JOB_NAME_PATTERN.match(job.job_name):
        raise JobSpecError(f"--job-name {job.job_name!r} names the log file: use letters, digits and _.+- only")
    for key, _ in job.sbatch_options:
        check_sbatch_key(key)


def check_sbatch_key(key: str) -> None:
    if key in MANAGED_SBATCH_OPTIONS:
        raise JobSpecError(f"--sbatch-option {key} is set by `mplug submit slurm` itself: "
                           f"{MANAGED_SBATCH_OPTIONS[key]}")
    if not SBATCH_KEY_PATTERN.match(key):
        raise JobSpecError(f"--sbatch-option {key!r} is not an sbatch long option name: write KEY=VALUE or KEY "
                           "without dashes, e.g. --sbatch-option mem=64G or --sbatch-option exclusive")


def parse_sbatch_option(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` (`--KEY=VALUE` also accepted) or a bare `KEY` flag, e.g. `exclusive`."""
    key, sep, value = text.lstrip("-").partition("=")
    check_sbatch_key(key)
    return key, (value if sep else None)


def master_port_for_job(job_id: int) -> int:
    """The rendezvous port of a job without --master-port (what the script computes in bash)."""
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN


def training_command_that_resumes(command: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """`command` with `--resume auto` added when it is an `mplug pretrain|finetune` run without
    --resume, so that a requeued job continues from its checkpoint; and whether it was added."""
    words = list(command)
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "cluster.cli"]:
        subcommand_at = 3
    elif words and Path(words[0]).name == "mplug":
        subcommand_at = 1
    else:
        return command, False
    if len(words) <= subcommand_at or words[subcommand_at] not in TRAINING_COMMANDS:
        return command, False
    if "--nproc-per-node" in words or any(w.startswith("--nproc-per-node=") for w in words):
        raise JobSpecError("drop --nproc-per-node from the command: under Slurm every task (`srun`) is one rank; "
                           "ask for ranks with --nodes, --gpus-per-node and --ntasks-per-node")
    if any(w == "--resume" or w.startswith("--resume=") or w in NOT_TRAINING_FLAGS for w in words):
        return command, False
    return (*command, *RESUME_AUTO), True


def sbatch_header(job: SlurmJob) -> list[str]:
    options: list[tuple[str, str | None]] = [
        ("job-name", job.job_name), ("nodes", str(job.nodes)), ("ntasks-per-node", str(job.tasks_per_node))]
    if job.gpus_per_node:
        options.append(("gpus-per-node", str(job.gpus_per_node)))
    for key, value in (("cpus-per-task", job.cpus_per_task), ("partition", job.partition),
                       ("account", job.account), ("time", job.time)):
        if value is not None:
            options.append((key, str(value)))
    options += [("output", job.log_path), ("open-mode", "append"), ("requeue", None),
                ("signal", f"B:{PREEMPTION_SIGNAL}@{job.signal_before_s}"), *job.sbatch_options]
    return [f"#SBATCH --{key}" + ("" if value is None else f"={value}") for key, value in options]


def rank_wiring(job: SlurmJob) -> list[str]:
    port = str(job.master_port) if job.master_port is not None else \
        f"$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % {MASTER_PORT_SPAN} ))"
    return [
        "# rank wiring: the rendezvous is the job's first node; every task finds its place from Slurm's variables",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"MASTER_PORT={port}",
        "export MASTER_ADDR MASTER_PORT",
        "TASK_PLACE='export RANK=\"$SLURM_PROCID\" WORLD_SIZE=\"$SLURM_NTASKS\" LOCAL_RANK=\"$SLURM_LOCALID\"; "
        "exec \"$@\"'",
    ]


def srun_line(job: SlurmJob) -> str:
    # srun in 22.05+ does not inherit --cpus-per-task from sbatch: say it again
    cpus = f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else ""
    return f'srun --kill-on-bad-exit=1{cpus} bash -c "$TASK_PLACE" {TASK_PROGRAM_NAME} "${{COMMAND[@]}}" &'


PREEMPTION = """\
# preemption: Slurm sends {signal} to this shell before the time limit (or `scancel --signal={signal} --batch`);
# srun passes it on to every task, which checkpoints and exits; then the job goes back to the queue
preempted=0
step=""
on_preemption() {{
  preempted=1
  echo "mplug: {signal}: the tasks checkpoint and stop, then job $SLURM_JOB_ID is requeued"
  if [ -n "$step" ]; then kill -{signal} "$step" 2>/dev/null || true; fi
}}
trap on_preemption {signal}
"""

WAIT_AND_REQUEUE = """\
step=$!
status=0
wait "$step" || status=$?
while [ "$status" -gt 128 ] && kill -0 "$step" 2>/dev/null; do  # the trap interrupted `wait`: wait on
  status=0
  wait "$step" || status=$?
done
if [ "$preempted" = 1 ]; then
  echo "mplug: the tasks stopped (exit status $status); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def render_script(job: SlurmJob) -> str:
    """The batch script for `job` (see the module docstring for its parts)."""
    lines = ["#!/bin/bash",
             f"# Written by `mplug submit slurm`: {job.nodes} node(s) x {job.tasks_per_node} task(s), one rank each.",
             *sbatch_header(job),
             "set -eo pipefail",
             "",
             "# environment",
             *job.env_setup,
             "set -u",
             "",
             *rank_wiring(job),
             "",
             "COMMAND=(" + " ".join(shlex.quote(word) for word in job.command) + ")",
             'echo "mplug: job $SLURM_JOB_ID, run $(( ${SLURM_RESTART_COUNT:-0} + 1 )), on $SLURM_JOB_NODELIST;'
             ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
             "",
             PREEMPTION.format(signal=PREEMPTION_SIGNAL),
             srun_line(job),
             WAIT_AND_REQUEUE]
    return "\n".join(lines)
