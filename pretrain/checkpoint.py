"""Resumable checkpoints: DeepSpeed's sharded model/optimizer/scheduler state plus each rank's own.

    OUTPUT/checkpoints/step_00000100/   DeepSpeed's files (every rank's ZeRO partitions; the ITC
                                        queue is a buffer of the module, so it is in them)
                                        rank_00000.pt ...   per rank: data position, RNG states
                                        complete.json       written last: the checkpoint is whole

A checkpoint without `complete.json` (a run killed while saving) is never resumed from.
`--resume auto` takes the newest complete one; only the newest `keep` are kept. These files
resume the same run only; the model package (`package.py`) is what other programs load.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("mplug.pretrain")
CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under OUTPUT, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: 'auto' (the newest complete one, or none), a path, or None."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no complete checkpoint there (no {COMPLETE}); give 'auto' or a folder such as "
            f"{Path(output) / CHECKPOINTS / tag_for(1000)}"
        )
    return path


def save_checkpoint(engine, output: Path, step: int, rank: int, world_size: int, rank_state: dict[str, Any],
                    keep: int) -> Path:
    """Every rank calls this at the same step; rank 0 marks it complete and prunes old ones."""
    root = Path(output) / CHECKPOINTS
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save({**rank_state, "rng": rng_states()}, root / tag / f"rank_{rank:05d}.pt")
    torch.distributed.barrier()
    if rank == 0:
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size}))
        for old in complete_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return root / tag


def load_checkpoint(engine, path: Path, rank: int, world_size: int) -> tuple[int, dict[str, Any]]:
    """Restore the engine and this rank's RNG; returns (step, this rank's state) to resume from."""
    info = json.loads((path / COMPLETE).read_text())
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rank_file = path / f"rank_{rank:05d}.pt"
    rank_state: dict[str, Any] = {}
    if info["world_size"] != world_size or not rank_file.is_file():
        log.warning("checkpoint %s was written by %d ranks, this run has %d: model and optimizer resume, "
                    "data positions and RNG states start afresh", path, info["world_size"], world_size)
    else:
        rank_state = torch.load(rank_file, weights_only=False)
        restore_rng_states(rank_state.pop("rng"))
    return int(client["step"]), rank_state
