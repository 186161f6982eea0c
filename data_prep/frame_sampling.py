"""Which frames of a video a clip is made of: segment-based sampling (TSN, as mPLUG-2 samples).

The video's `total` frames are split into `count` equal segments and one frame is taken from
each: a uniformly random one in training, the middle one in evaluation. The clip so covers the
whole video at any length, and training sees a different frame of each segment every epoch.

    segment_indices(10, 4, train=False)  ->  [0, 3, 5, 8]     segments [0,2) [2,5) [5,7) [7,10)
    segment_indices(3, 5, train=False)   ->  [0, 1, 2, 2, 2]   shorter than the clip: repeat the last frame
"""

from __future__ import annotations

import random


def segment_bounds(total: int, count: int) -> list[tuple[int, int]]:
    """[start, end) of each of `count` segments of `total` frames (total >= count), as equal as integers allow."""
    return [(index * total // count, (index + 1) * total // count) for index in range(count)]


def segment_indices(total: int, count: int, *, train: bool, rng: random.Random | None = None) -> list[int]:
    """`count` frame indices into a video of `total` frames, in temporal order.

    train: one uniformly random frame per segment, drawn from `rng` (a fresh `random.Random()`
    when None); eval: the middle frame of each segment ((start + end - 1) // 2). A video of fewer
    than `count` frames gives every frame once, then its last frame until there are `count`.
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame to sample from; got total={total}")
    if count < 1:
        raise ValueError(f"frames to sample must be at least 1; got count={count}")
    if total < count:
        return list(range(total)) + [total - 1] * (count - total)
    bounds = segment_bounds(total, count)
    if not train:
        return [(start + end - 1) // 2 for start, end in bounds]
    rng = rng or random.Random()
    return [rng.randrange(start, end) for start, end in bounds]
