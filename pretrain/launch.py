"""Where a training process sits in its job, and how a job of N local processes is started.

A process learns its rank from the environment, whichever launcher set it:
`torchrun` / `deepspeed` / Ray Train (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or
Slurm's `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous address then comes
from MASTER_ADDR, which the job script exports). Without any of them it is rank 0 of 1.
DeepSpeed reads only the torchrun variables (else it tries MPI), so `init_distributed` writes
them back before it starts. Without a GPU the backend is gloo on DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class ProcessPlace:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def place_from_environment(env: dict[str, str] | None = None) -> ProcessPlace:
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessPlace(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), addr, port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessPlace(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                            addr, port)
    return ProcessPlace(master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port())


def use_cpu_accelerator_without_gpu() -> None:
    """DeepSpeed picks its accelerator at import: point it at the CPU when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(place: ProcessPlace) -> str:
    """Start the process group (a no-op for a single process); returns the backend."""
    use_cpu_accelerator_without_gpu()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update({
        "RANK": str(place.rank), "WORLD_SIZE": str(place.world_size), "LOCAL_RANK": str(place.local_rank),
        "MASTER_ADDR": place.master_addr, "MASTER_PORT": str(place.master_port),
    })
    if torch.cuda.is_available():
        torch.cuda.set_device(place.local_rank)
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return backend


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((DEFAULT_MASTER_ADDR, 0))
        return probe.getsockname()[1]


def launch_local(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `nproc` ranks on this machine (torchrun); returns its exit code."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-addr={DEFAULT_MASTER_ADDR}", f"--master-port={free_port()}", "-m", module, *argv]
    return subprocess.call(command)
