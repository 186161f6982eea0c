"""Random draws for a whole global batch, sliced to this rank's rows.

MLM masking and PrefixLM splits draw their random numbers through `BatchDraws`. Seeded from
(seed, step, micro-batch) and drawn for all `world` ranks' rows before slicing, a sample gets the
same mask and split whether the global batch runs on one rank or on many, and a resumed run
draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch

# Mixes (seed, step, micro-batch) into one generator seed; primes keep nearby steps apart.
SEED_MIX = (1_000_003, 1_009)


class BatchDraws:
    def __init__(self, generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world), got rank {rank} with world {world}")
        self.generator, self.rank, self.world = generator, rank, world

    @classmethod
    def for_step(cls, seed: int, step: int, micro: int, rank: int, world: int) -> BatchDraws:
        mixed = seed * SEED_MIX[0] + step * SEED_MIX[1] + micro
        return cls(torch.Generator().manual_seed(mixed), rank, world)

    def _rows(self, full: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
        return full[self.rank * rows:(self.rank + 1) * rows].to(device)  # (rows, ...)

    def rand(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) of `shape` whose dim 0 is this rank's share of the global batch."""
        if self.generator is None and self.world == 1:
            return torch.rand(shape, device=device)
        full = torch.rand((shape[0] * self.world, *shape[1:]), generator=self.generator)
        return self._rows(full, shape[0], device)

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if self.generator is None and self.world == 1:
            return torch.randint(high, shape, device=device)
        full = torch.randint(high, (shape[0] * self.world, *shape[1:]), generator=self.generator)
        return self._rows(full, shape[0], device)
