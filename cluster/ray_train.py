"""`python -m cluster.ray_train --workers N [--gpus-per-worker G] [--cpus-per-worker C] -- COMMAND...`

The driver of a training job on Ray, what `mplug submit ray --workers N` submits: a Ray Train
TorchTrainer places N workers, and each runs COMMAND (`mplug pretrain ...`) as one rank of the
job, with RANK, WORLD_SIZE and LOCAL_RANK from Ray Train's context, MASTER_ADDR the address of
rank 0's node and MASTER_PORT a port that was free there. The exit code is 0 when every rank
exited 0, else the first failed rank's (1 when Ray Train failed without one).

Each rank is a subprocess of its worker rather than a call of the CLI inside it:

- Ray Train runs the training function in a thread of the worker ("TrainingThread"), and the
  trainer installs its SIGTERM/SIGUSR1 handlers with `signal.signal`, which only a process's main
  thread may call;
- the rank starts its process group the way it does under torchrun or srun (DeepSpeed; nccl on
  GPUs). Ray Train's own group is gloo and unused: rank 0's address and port reach the other
  workers through `ray.train.collective.broadcast_from_rank_zero`;
- a rank never outlives its worker: it gets SIGTERM when the worker's process ends (Linux
  PR_SET_PDEATHSIG, set by a small launcher that then execs COMMAND).

TorchTrainer lets the workers of a node see all of its GPUs (CUDA_VISIBLE_DEVICES), so LOCAL_RANK
picks the GPU as it does under torchrun. A rank's output goes to its worker's log, which Ray
streams into the job's logs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from typing import Any

EXIT_FAILED = 1
TRAIN_V2_VARIABLE = "RAY_TRAIN_V2_ENABLED"
STORAGE_PREFIX = "mplug-ray-train-"
GLOO = "gloo"  # Ray Train's own process group: only CPU tensors, never used by the ranks
# Runs in the rank's process before COMMAND replaces it: SIGTERM when the parent (the Ray Train
# worker) dies. 1 is PR_SET_PDEATHSIG; exec keeps the setting.
RANK_LAUNCHER = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) if sys.platform == 'linux' else None; "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


class RankFailed(RuntimeError):
    """COMMAND exited non-zero on one rank."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # it travels from the worker to the driver
        return (self.__class__, (str(self), self.exit_code))


def rank_environment(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
                     base: dict[str, str]) -> dict[str, str]:
    """The environment of one rank: the worker's, with the variables `pretrain.launch` reads."""
    return {**base, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def free_port() -> int:
    """A port free on every interface of this node (the other nodes connect to it)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def run_rank(config: dict[str, Any]) -> None:
    """The Ray Train training function: COMMAND as this worker's rank; raises RankFailed on a non-zero exit."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    here = (ray.util.get_node_ip_address(), free_port()) if rank == 0 else None
    master_addr, master_port = broadcast_from_rank_zero(here)
    env = rank_environment(rank, world_size, context.get_local_rank(), master_addr, master_port, dict(os.environ))
    command = config["command"]
    code = subprocess.call([sys.executable, "-c", RANK_LAUNCHER, *command], env=env)
    if code != 0:
        raise RankFailed(f"rank {rank} of {world_size}: `{shlex.join(command)}` exited with {code}", code)


def failed_exit_code(error: Exception) -> int:
    """The exit code of the first rank that failed, if the error carries one."""
    failures = getattr(error, "worker_failures", {})
    for rank in sorted(failures):
        code = getattr(failures[rank], "exit_code", None)
        if code:
            return code
    return EXIT_FAILED


def build_trainer(command: list[str], workers: int, cpus_per_worker: float, gpus_per_worker: float,
                  storage_path: str):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        run_rank,
        train_loop_config={"command": command},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend=GLOO),
        run_config=ray.train.RunConfig(storage_path=storage_path),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_train", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, required=True, help="ranks: one per Ray Train worker")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs of each worker (default: 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of each worker (default: 1)")
    parser.add_argument("--storage-path", default=None,
                        help="where Ray Train keeps the run's state (default: a temporary folder, removed at "
                             "the end: the ranks checkpoint into their own --output, Ray Train keeps nothing)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="what each rank runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run: put it after `--`, e.g. `-- mplug pretrain --config base ...`")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    # ray.train.collective is Ray Train v2's: the default of the Ray tested here (2.60); releases from 2.43
    # on need this variable, which Ray passes on to the workers.
    os.environ.setdefault(TRAIN_V2_VARIABLE, "1")
    import ray.train

    with tempfile.TemporaryDirectory(prefix=STORAGE_PREFIX) as scratch:
        trainer = build_trainer(command, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                                args.storage_path or scratch)
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as error:
            print(f"error: training failed: {error}", file=sys.stderr)
            return failed_exit_code(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
