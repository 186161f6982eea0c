"""`mplug submit slurm ... -- COMMAND...`: run a command as a Slurm batch job, one rank per task.

The script comes from `cluster.sbatch_script.render_script` (rendering is pure); this file reads
the command line into a `SlurmJob`, prints the script (`--dry-run`) or hands it to `sbatch` and
says where the log goes. A training command without --resume gets `--resume auto`, so a job that
is requeued after preemption continues from its checkpoint instead of starting over.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cluster.sbatch_script import (
    DEFAULT_JOB_NAME,
    DEFAULT_SIGNAL_BEFORE_S,
    PREEMPTION_SIGNAL,
    JobSpecError,
    SlurmJob,
    parse_sbatch_option,
    render_script,
    training_command_that_resumes,
)

DEFAULT_LOG_DIR = "slurm-logs"


def register(targets: argparse._SubParsersAction) -> None:
    slurm = targets.add_parser(
        "slurm", help="submit to Slurm with sbatch: one rank per task, requeued on preemption",
        description="Write an sbatch script that activates the environment, starts one task per GPU with srun "
                    "(RANK / WORLD_SIZE / LOCAL_RANK from Slurm, the rendezvous on the first node) and runs "
                    f"COMMAND in every task; on {PREEMPTION_SIGNAL} before the time limit the tasks checkpoint, the "
                    "job requeues itself and the next run resumes. Prints the script with --dry-run, else submits "
                    "it and prints the job id and log path.")
    slurm.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node (default: 0)")
    slurm.add_argument("--ntasks-per-node", type=int, metavar="T",
                       help="ranks per node (default: --gpus-per-node, or 1)")
    slurm.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per rank (default: the partition's)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account to charge")
    slurm.add_argument("--time", metavar="LIMIT", help="time limit, e.g. 2-00:00:00 (default: the partition's)")
    slurm.add_argument("--job-name", default=DEFAULT_JOB_NAME, metavar="NAME", help=f"(default: {DEFAULT_JOB_NAME})")
    slurm.add_argument("--log-dir", type=Path, default=Path(DEFAULT_LOG_DIR), metavar="DIR",
                       help=f"where the job's log JOB_NAME-JOBID.out goes (default: ./{DEFAULT_LOG_DIR})")
    slurm.add_argument("--env-setup", action="append", default=[], metavar="LINE",
                       help="a shell line that makes `mplug` available, e.g. 'module load cuda' or "
                            "'conda activate mplug' (repeatable; default: activate the prefix this mplug runs from)")
    slurm.add_argument("--master-port", type=int, metavar="PORT",
                       help="rendezvous port (default: derived from the job id)")
    slurm.add_argument("--signal-before", type=int, default=DEFAULT_SIGNAL_BEFORE_S, metavar="SECONDS",
                       help=f"ask Slurm for {PREEMPTION_SIGNAL} this long before the time limit, time to checkpoint "
                            f"(default: {DEFAULT_SIGNAL_BEFORE_S})")
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. mem=64G, constraint=a100, exclusive (repeatable)")
    slurm.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    slurm.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...: what every task runs")
    slurm.set_defaults(handler=lambda args: run_submit(slurm, args))


def default_env_setup(prefix: str = sys.prefix) -> tuple[str, ...]:
    """Activate the virtual environment (or put the prefix's bin/ first on PATH) `mplug` runs from."""
    activate = Path(prefix) / "bin" / "activate"
    if activate.is_file():
        return (f"source {shlex.quote(str(activate))}",)
    return (f'export PATH={shlex.quote(str(Path(prefix) / "bin"))}:"$PATH"',)


def job_from_arguments(args: argparse.Namespace, command: list[str]) -> tuple[SlurmJob, bool]:
    """The job spec, and whether `--resume auto` was added to the command."""
    resuming, added = training_command_that_resumes(tuple(command))
    job = SlurmJob(
        command=resuming, log_dir=args.log_dir.resolve(),
        env_setup=tuple(args.env_setup) or default_env_setup(),
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, time=args.time,
        job_name=args.job_name, master_port=args.master_port, signal_before_s=args.signal_before,
        sbatch_options=tuple(parse_sbatch_option(text) for text in args.sbatch_option))
    return job, added


def run_submit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from cluster.submit import command_after_dashes  # cluster.submit imports this module

    command = command_after_dashes(parser, args.command)
    try:
        job, added = job_from_arguments(args, command)
    except JobSpecError as error:
        parser.error(str(error))
    if added:
        print("mplug: added `--resume auto` to the command: a job requeued after preemption continues from its "
              "checkpoint", file=sys.stderr)
    script = render_script(job)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(script, job)
    print(f"submitted Slurm job {job_id} ({job.job_name}); log: {job.log_file(job_id)}")
    return 0


def submit(script: str, job: SlurmJob) -> str:
    """Hand the script to sbatch; returns the job id. Keeps a copy of the script beside the log."""
    if shutil.which("sbatch") is None:
        raise SystemExit("mplug: sbatch is not on PATH: submit from a Slurm login node (or install slurm-client "
                         "and point SLURM_CONF at the cluster's slurm.conf); --dry-run prints the script")
    job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's folder
    result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mplug: sbatch refused the job (exit status {result.returncode}): "
                         f"{result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable: JOBID or JOBID;CLUSTER
    job.log_dir.joinpath(f"{job.job_name}-{job_id}.sbatch").write_text(script)
    return job_id
