"""Samples/s per core of the training loader's stages, from 256 px JPEG shards, as ratios to decoding.

A GPU step of mPLUG-base consumes hundreds of images a second; the loader must keep up with a
few cores per GPU. This script writes photo-like 256 px JPEG shards (smooth colour fields with
sensor-like noise, ~40 KB each, so decoding costs what it costs on web images), then measures in
one process on one thread (per core):

- decode (PIL):            tar read + PIL decode to RGB
- decode (torchvision.io): tar read + libjpeg-turbo decode to a uint8 tensor (the loader's decoder)
- + crop, flip, tokenise:  the loader's training path without RandAugment (RandomResizedCrop
                           bicubic to 256, flip with text mirroring, batch tokenisation, collation)
- + RandAugment(2, 7):     the full pretraining recipe

Each path runs through the project's own code (`read_shard`, `decode_rgb`, `ShardLoader` with
workers=0). The variants run round-robin for several repeats; per variant the median rate, and
its ratio to torchvision decoding measured in the same repeat (median over repeats). The path
without RandAugment should reach at least 0.7 of decode-only.

    .venv/bin/python bench/loader.py [--images 600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.image_decode import decode_rgb, decode_with_pil
from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_source import read_shard
from data_prep.shard_writer import Sample, ShardWriter
from data_prep.tokenizer import train_wordpiece

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "loader.json"
IMAGE_SIZE = 256
SHARD_SIZE = 200
WORDS = "a photo of the red blue small large dog cat person street car tree sky near under on with".split()
TARGET_RATIO = 0.7


def photo_like(rng: np.random.Generator, size: int = IMAGE_SIZE) -> bytes:
    """A smooth random colour field plus noise, JPEG quality 90: decodes like a web photo."""
    field = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(field, dtype=np.float32) + rng.normal(0, 18, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shards(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    with ShardWriter(str(folder), shard_size=SHARD_SIZE) as writer:
        for index in range(count):
            caption = " ".join(rng.choice(WORDS, size=12))
            writer.write(Sample(f"{index:08d}", photo_like(rng), text=caption))
    counts = [min(SHARD_SIZE, count - i * SHARD_SIZE) for i in range(len(writer.shards))]
    write_manifest(str(folder), [ShardInfo(u, c) for u, c in zip(writer.shards, counts, strict=True)])
    return writer.shards


def decode_only(shards: list[str], decoder: Callable[[bytes], object]) -> int:
    count = 0
    for shard in shards:
        for sample in read_shard(shard, lambda url, error: None):
            decoder(sample["jpg"])
            count += 1
    return count


def through_loader(folder: Path, tokenizer, randaugment: bool) -> int:
    config = LoaderConfig(batch_size=64, image_size=IMAGE_SIZE, mode="epoch", augment="pretrain",
                          randaugment=randaugment, workers=0, shuffle_buffer=256)
    loader = ShardLoader(str(folder), config, tokenizer=tokenizer, rank=0, world_size=1)
    return sum(len(batch["keys"]) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        shards = write_bench_shards(folder, args.images)
        tokenizer = train_wordpiece([" ".join(WORDS)], Path(tmp) / "tokenizer", vocab_size=200)
        variants: dict[str, Callable[[], int]] = {
            "decode (PIL)": lambda: decode_only(shards, decode_with_pil),
            "decode (torchvision.io)": lambda: decode_only(shards, decode_rgb),
            "+ crop, flip, tokenise": lambda: through_loader(folder, tokenizer, randaugment=False),
            "+ RandAugment(2, 7)": lambda: through_loader(folder, tokenizer, randaugment=True),
        }
        baseline = "decode (torchvision.io)"
        for run in variants.values():  # warm-up: page cache, lazy imports
            run()
        rates: dict[str, list[float]] = {name: [] for name in variants}
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            names = list(variants)
            names = names[repeat % len(names):] + names[: repeat % len(names)]
            this_round = {}
            for name in names:
                started = time.perf_counter()
                count = variants[name]()
                this_round[name] = count / (time.perf_counter() - started)
                rates[name].append(this_round[name])
            for name in variants:
                ratios[name].append(this_round[name] / this_round[baseline])

    rows = [{"variant": name, "samples_per_s_per_core": round(statistics.median(rates[name]), 1),
             "ratio_to_decode": round(statistics.median(ratios[name]), 3)} for name in variants]
    print(f"{'variant':<26}{'samples/s/core':>16}{'ratio to decode':>18}")
    for row in rows:
        print(f"{row['variant']:<26}{row['samples_per_s_per_core']:>16.1f}{row['ratio_to_decode']:>18.3f}")
    without_randaugment = rows[2]["ratio_to_decode"]
    verdict = "meets" if without_randaugment >= TARGET_RATIO else "misses"
    print(f"crop+flip+tokenise at {without_randaugment:.2f} of decode-only: {verdict} the {TARGET_RATIO} target")
    result = {
        "benchmark": "loader",
        "images": args.images, "image_size": IMAGE_SIZE, "repeats": args.repeats,
        "baseline": baseline, "target_ratio": TARGET_RATIO, "meets_target": without_randaugment >= TARGET_RATIO,
        "rows": rows, "raw_rates": rates,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
