"""One reader's endless or one-pass stream of raw samples, with a position it can resume from.

A reader is one dataloader worker of one rank: its `slot` is `rank * workers + worker` among
`slots = world_size * workers`. Two modes:

- **resampled** (training): shards are drawn uniformly at random with replacement, from a generator seeded by (seed, slot). The stream never ends, so every rank
  takes the same number of steps however uneven the shards are.
- **epoch** (evaluation): one pass in which every sample is seen exactly once across all readers.
  With at least as many shards as readers, shards are dealt round-robin to readers; with fewer
  (a 5,000-image test set in one shard), every reader walks all shards and keeps every
  `slots`-th sample.

The position is (shards started, samples consumed of the current shard). Resuming re-draws the
same shard sequence without opening the finished shards and skips the consumed samples of the
current one undecoded, so a resumed run neither repeats nor skips data, except for what sat in a
shuffle buffer at the time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data_prep.manifest import ShardInfo
from data_prep.shard_source import ShardErrorCallback, read_shard

MODES = ("resampled", "epoch")
MAX_BARREN_DRAWS = 20  # empty shards drawn in a row (beyond twice the shard count) before giving up


@dataclass
class StreamPosition:
    shards_started: int = 0  # shards opened so far in this reader's sequence
    offset: int = 0  # samples consumed of the shard opened last

    def as_dict(self) -> dict[str, int]:
        return {"shards_started": self.shards_started, "offset": self.offset}


def reader_seed(seed: int, slot: int, name: str = "") -> int:
    """A generator seed distinct per reader (and per mixture source), stable across runs."""
    return random.Random(f"{seed}/{slot}/{name}").getrandbits(63)


class ShardStream:
    """Raw samples for reader `slot` of `slots`, tracking `position` as it goes."""

    def __init__(
        self,
        shards: list[ShardInfo],
        mode: str,
        slot: int,
        slots: int,
        seed: int,
        on_error: ShardErrorCallback,
        position: StreamPosition | None = None,
        name: str = "",
    ):
        if mode not in MODES:
            raise ValueError(f"loader mode {mode!r} is not one of {MODES}")
        if not shards:
            raise ValueError("a shard stream needs at least one shard")
        if not 0 <= slot < slots:
            raise ValueError(f"reader slot {slot} is outside 0..{slots - 1}")
        self.shards, self.mode, self.slot, self.slots = shards, mode, slot, slots
        self.seed, self.name, self.on_error = seed, name, on_error
        self.position = position or StreamPosition()

    def shard_sequence(self) -> Iterator[ShardInfo]:
        """This reader's shards in order: endless draws, or its share of one pass."""
        if self.mode == "resampled":
            # Uniform draws of whole shards give every sample the same chance, whatever the shard sizes.
            rng = random.Random(reader_seed(self.seed, self.slot, self.name))
            while True:
                yield rng.choice(self.shards)
        elif len(self.shards) >= self.slots:
            yield from self.shards[self.slot :: self.slots]
        else:
            yield from self.shards

    @property
    def splits_samples(self) -> bool:
        return self.mode == "epoch" and len(self.shards) < self.slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume = StreamPosition(**self.position.as_dict())
        sequence = self.shard_sequence()
        global_index = 0  # samples before this one over all shards: a sample-split pass deals by it
        barren = 0  # shards in a row that gave no sample
        for started, shard in enumerate(sequence):
            if started < resume.shards_started - 1:
                if self.splits_samples:  # the deal depends on every sample before: count them, undecoded
                    global_index += sum(1 for _ in read_shard(shard.url, self.on_error))
                continue  # finished before the checkpoint
            skip = resume.offset if started == resume.shards_started - 1 else 0
            self.position.shards_started, self.position.offset = started + 1, skip
            global_index += skip
            barren += 1
            if self.mode == "resampled" and barren > MAX_BARREN_DRAWS + 2 * len(self.shards):
                raise RuntimeError(
                    f"{barren} shards in a row of source {self.name or 'data'!r} gave no sample "
                    f"(last: {shard.url}); check that its {len(self.shards)} shards exist and are readable"
                )
            for sample in read_shard(shard.url, self.on_error, skip=skip):
                barren = 0
                self.position.offset += 1
                mine = not self.splits_samples or global_index % self.slots == self.slot
                global_index += 1
                if mine:
                    sample["__shard__"] = shard.url
                    yield sample
