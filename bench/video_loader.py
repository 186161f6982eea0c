"""Clips/s per core of decoding and sampling 16 frames from mp4 clips, and of the loader's video path.

mPLUG-2 fine-tunes on 16 frames a clip at 224 px; a GPU step eats dozens of clips, so the cost
that matters is the decoding of each clip on the loader's cores. This script encodes 224 px H.264
clips at 25 fps (x264's default preset and quality, as web videos are encoded): a long one of 8 s
(200 frames, a WebVid clip's typical length) and a short one of 2 s (50 frames). Their content is
a slowly panning smooth colour field with a moving shape and mild sensor noise, so the decoder has
real residuals to work through (a flat background would decode many times faster than a video).
Then, on one thread, for several repeats:

- decode every frame:         the floor of any decoder that reads the stream in order (no RGB)
- decode every frame + RGB:   what decoding the whole clip to RGB arrays costs
- sample 16 (train / eval):   `decode_video`: decoding up to the last sampled frame, converting
                              the 16 sampled frames to RGB (random per segment / middle frames)
- loader (train|eval):        `ShardLoader(frames=16, batch_size=8, workers=1)` on shards of the
                              long clips, steady state after the first batch: tar read, decode,
                              sampling, crop + flip (train) or resize (eval) to 224, tokenisation,
                              collation into (8, 16, 3, 224, 224) uint8; the worker is the one core

Rates are clips per CPU-second (of this process, and of the loader's worker for the loader):
time on a core, which other jobs on a shared machine inflate far less than wall time. The
decoders take turns on every clip; per variant the median over the repeats of its rate and of
its ratio to "decode every frame" in the same repeat.

    .venv/bin/python bench/video_loader.py [--clips 12] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import psutil
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_writer import Sample, ShardWriter
from data_prep.synthetic_video import encode_mp4
from data_prep.tokenizer import train_wordpiece
from data_prep.video_decode import DECODE_THREADS, decode_video

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "video_loader.json"
SIZE = 224
FPS = 25
FRAMES = 16
BATCH = 8
LENGTHS = {"8 s": 8 * FPS, "2 s": 2 * FPS}  # frames per clip
PAN = 1.5  # background pixels per frame
FIELD_CELLS = (48, 96)  # random colours the background is interpolated from (rows, columns)
NOISE = 8.0  # sensor noise, std of 0-255 values: with the field, ~350 kbit/s at 224 px, as web video
WORDS = "a video of the red blue man woman dog car street walking running near under on with".split()
BASELINE = "decode every frame"


def textured_clip(rng: np.random.Generator, frames: int, size: int = SIZE) -> list[np.ndarray]:
    """A smooth colour field panning sideways, a square crossing it, mild noise on every frame."""
    width = size + int(PAN * frames) + 1
    field = Image.fromarray((rng.random((*FIELD_CELLS, 3)) * 255).astype(np.uint8)).resize((width, size), Image.BICUBIC)
    field = np.asarray(field, dtype=np.float32)
    colour = rng.integers(0, 255, 3)
    side = size // 5
    out = []
    for index in range(frames):
        offset = int(PAN * index)
        frame = field[:, offset:offset + size].copy()
        x = int((size - side) * index / max(frames - 1, 1))
        frame[size // 3:size // 3 + side, x:x + side] = colour
        frame += rng.normal(0, NOISE, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


def decode_every_frame(data: bytes, rgb: bool) -> None:
    reformatter = VideoReformatter()  # as decode_video converts: one scaler set up per clip
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODE_THREADS
        for frame in container.decode(stream):
            if rgb:
                reformatter.reformat(frame, format="rgb24").to_ndarray()


def write_clip_shards(folder: Path, clips: list[bytes]) -> None:
    rng = random.Random(0)
    with ShardWriter(str(folder), shard_size=len(clips)) as writer:
        for index, data in enumerate(clips):
            writer.write(Sample(f"{index:06d}", data, "mp4", " ".join(rng.choices(WORDS, k=12))))
    write_manifest(str(folder), [ShardInfo(url, len(clips)) for url in writer.shards])


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the loader's worker): time on a core, which
    other jobs on a shared machine do not inflate as they do wall time."""
    children = psutil.Process().children(recursive=True)
    return time.process_time() + sum(sum(child.cpu_times()[:2]) for child in children)


def loader_rate(folder: Path, tokenizer, augment: str, batches: int) -> float:
    """Clips per CPU-second of the loader (worker and main process), after its first batch."""
    config = LoaderConfig(batch_size=BATCH, image_size=SIZE, frames=FRAMES, mode="resampled", augment=augment,
                          randaugment=False, workers=1, shuffle_buffer=0)
    iterator = iter(ShardLoader(str(folder), config, tokenizer=tokenizer, rank=0, world_size=1))
    first = next(iterator)  # the worker's start and first batch are not counted
    assert first["images"].shape == (BATCH, FRAMES, 3, SIZE, SIZE)
    started = cpu_seconds()
    for _ in itertools.islice(iterator, batches):
        pass
    spent = cpu_seconds() - started
    del iterator  # stops the worker
    return batches * BATCH / spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12, help="clips of each length (default: %(default)s)")
    parser.add_argument("--loader-batches", type=int, default=4, help="loader batches of 8 counted (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    clips = {name: [encode_mp4(textured_clip(rng, frames), FPS, preset="medium") for _ in range(args.clips)]
             for name, frames in LENGTHS.items()}
    sizes = {name: statistics.mean(len(data) for data in datas) for name, datas in clips.items()}
    sampling = random.Random(0)
    decoders: dict[str, Callable[[bytes], object]] = {
        BASELINE: lambda d: decode_every_frame(d, rgb=False),
        "decode every frame + RGB": lambda d: decode_every_frame(d, rgb=True),
        f"sample {FRAMES} (train)": lambda d: decode_video(d, FRAMES, train=True, rng=sampling),
        f"sample {FRAMES} (eval)": lambda d: decode_video(d, FRAMES, train=False),
    }
    loaders = {"loader, 1 worker (train: crop, flip)": "finetune", "loader, 1 worker (eval: resize)": "eval"}
    names = [f"{length}: {name}" for length in LENGTHS for name in decoders] + [f"8 s: {name}" for name in loaders]
    rates: dict[str, list[float]] = {name: [] for name in names}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_clip_shards(folder, clips["8 s"])
        tokenizer = train_wordpiece([" ".join(WORDS)], Path(tmp) / "tokenizer", vocab_size=200)
        for repeat in range(args.repeats + 1):  # repeat 0 warms up: imports, caches, the tokenizer
            # The decoders take turns on every clip, in an order that rotates: slow spells of a
            # shared machine fall on all of them alike.
            spent = dict.fromkeys(names, 0.0)
            for length, datas in clips.items():
                for index, data in enumerate(datas):
                    order = list(decoders)
                    turn = (repeat + index) % len(order)
                    for name in order[turn:] + order[:turn]:
                        started = time.process_time()
                        decoders[name](data)
                        spent[f"{length}: {name}"] += time.process_time() - started
            for length, datas in clips.items():
                for name in decoders:
                    if repeat:
                        rates[f"{length}: {name}"].append(len(datas) / spent[f"{length}: {name}"])
            for name, augment in loaders.items():
                rate = loader_rate(folder, tokenizer, augment, args.loader_batches)
                if repeat:
                    rates[f"8 s: {name}"].append(rate)

    ratios = {name: [rate / rates[f"{name.split(':')[0]}: {BASELINE}"][i] for i, rate in enumerate(values)]
              for name, values in rates.items()}
    rows = [{"variant": name, "clips_per_cpu_s": round(statistics.median(rates[name]), 2),
             "ratio_to_decode_every_frame": round(statistics.median(ratios[name]), 3)} for name in names]
    print(f"{'variant':<44}{'clips/s/core':>14}{'ratio':>8}")
    for row in rows:
        print(f"{row['variant']:<44}{row['clips_per_cpu_s']:>14.2f}{row['ratio_to_decode_every_frame']:>8.3f}")
    for name, frames in LENGTHS.items():
        print(f"{name} clip: {frames} frames, {sizes[name] / 1024:.0f} KiB, {sizes[name] * 8 / 1000 / (frames / FPS):.0f} kbit/s")
    result = {
        "benchmark": "video_loader",
        "clip": {"size": SIZE, "fps": FPS, "frames": LENGTHS, "codec": "libx264 preset medium, crf 23, yuv420p",
                 "mean_bytes": {name: round(value) for name, value in sizes.items()}},
        "sampled_frames": FRAMES, "batch_size": BATCH, "clips": args.clips, "repeats": args.repeats,
        "baseline": BASELINE, "rows": rows, "raw_rates": rates,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "av": av.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
