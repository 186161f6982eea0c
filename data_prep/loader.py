"""The loader that feeds training and evaluation from webdataset shards.

    loader = ShardLoader("shards/manifest.json", LoaderConfig(batch_size=64, image_size=256),
                         tokenizer=tokenizer, rank=rank, world_size=world_size)
    for batch in loader:          # {"images": uint8 (B, 3, S, S), "input_ids", "attention_mask",
        ...                       #  "texts", "meta", "keys", "image_ids"}
    LoaderConfig(..., frames=16)  # video samples: "images" uint8 (B, 16, 3, S, S)
    state = loader.state_dict()   # saved with a checkpoint; ShardLoader(..., state=state) resumes

Each dataloader worker of each rank is one reader (`shard_stream.py`): resampled endless streams
for training, one exact pass for evaluation. Per reader: sources mixed by weight (`mixture.py`),
a shuffle buffer over the raw samples, decoding, augmentation (`augment.py`), batching and
tokenisation, all inside the worker. A corrupt sample or a damaged shard is skipped, counted
(`loader.stats`) and logged, never a crash. Images stay uint8: `data_prep.batch.normalize`
finishes them on the device.

With `frames` N > 0 the samples are videos (`KEY.mp4|avi|webm|mkv|mov`, or frames stored as
`KEY.000.jpg`, `KEY.001.jpg`, ...): N frames sampled by segments (`frame_sampling.py`; random
within each segment unless `augment="eval"`, then the middle ones) and augmented as one image,
one crop, flip and RandAugment draw for the whole clip (`augment.py`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.augment import PRESETS, AugmentConfig, ImageAugment, mirror_texts
from data_prep.batch import tokenize
from data_prep.image_decode import decode_rgb
from data_prep.mixture import Source, load_sources
from data_prep.shard_stream import MODES, ShardStream, StreamPosition, reader_seed
from data_prep.video_decode import decode_clip

log = logging.getLogger("mplug.data")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WARN_FIRST = 20  # problems logged one by one per reader; after that every WARN_EVERY-th
WARN_EVERY = 1000


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    image_size: int
    mode: str = "resampled"  # "resampled" (training, endless) or "epoch" (evaluation, one exact pass)
    augment: str = "pretrain"  # "pretrain", "finetune" or "eval" (see augment.PRESETS)
    crop: bool | None = None  # None: as the augment preset says
    flip: bool | None = None
    randaugment: bool | None = None
    workers: int = 2  # dataloader processes per rank; 0 reads in the calling process
    shuffle_buffer: int = 1000  # raw samples per reader; 0 keeps shard order
    seed: int = 0
    max_text_length: int = 30
    pad_to_max: bool = False  # pad every batch to max_text_length (same shapes on every rank)
    text_field: str = "txt"  # the shard's caption, or a key of KEY.json such as "question"
    box_field: str | None = None  # a KEY.json key with [x, y, w, h] carried through resize and flip
    frames: int = 0  # 0: image samples; N > 0: video samples, N frames a clip -> images (B, N, 3, S, S)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"loader mode {self.mode!r} is not one of {MODES}")
        if self.augment not in PRESETS:
            raise ValueError(f"augment {self.augment!r} is not one of {sorted(PRESETS)}")
        if self.batch_size < 1 or self.workers < 0 or self.shuffle_buffer < 0 or self.frames < 0:
            raise ValueError(
                f"batch_size must be >= 1, workers, shuffle_buffer and frames >= 0; got {self.batch_size}, "
                f"{self.workers}, {self.shuffle_buffer}, {self.frames}"
            )

    def augment_config(self) -> AugmentConfig:
        changes = {k: v for k, v in (("crop", self.crop), ("flip", self.flip), ("randaugment", self.randaugment))
                   if v is not None}
        return AugmentConfig.preset(self.augment, self.image_size, **changes)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from an initialised process group, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Reader:
    """Everything one reader does, from raw samples to batches; carries its position and counters."""

    def __init__(self, sources: list[Source], config: LoaderConfig, tokenizer, slot: int, slots: int,
                 position: dict[str, Any] | None):
        self.config, self.tokenizer, self.slot = config, tokenizer, slot
        self.stats: Counter[str] = Counter()
        position = position or {}
        saved = position.get("streams", {})
        self.streams = [
            ShardStream(source.shards, config.mode, slot, slots, config.seed, self.shard_failed,
                        StreamPosition(**saved[source.name]) if source.name in saved else None, name=source.name)
            for source in sources
        ]
        self.weights = [source.weight for source in sources]
        self.draws = int(position.get("draws", 0))
        self.decoded = int(position.get("decoded", 0))  # samples this reader has decoded, the corrupt ones too
        self.augment_seed = reader_seed(config.seed, slot, "augment")
        self.augment = ImageAugment(config.augment_config(), random.Random())

    def warn(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        count = self.stats[kind]
        if count <= WARN_FIRST or count % WARN_EVERY == 0:
            log.warning("%s (#%d of this kind in reader %d): %s", kind.replace("_", " "), count, self.slot, message)

    def shard_failed(self, url: str, error: Exception) -> None:
        self.warn("bad_shards", f"shard {url} unreadable or truncated, rest of it skipped: {error}")

    def position(self) -> dict[str, Any]:
        streams = {stream.name: stream.position.as_dict() for stream in self.streams}
        return {"slot": self.slot, "streams": streams, "draws": self.draws, "decoded": self.decoded}

    def raw_samples(self) -> Iterator[dict[str, Any]]:
        """The sources mixed by weight (resampled) or one after another (epoch)."""
        if self.config.mode == "epoch":
            for stream in self.streams:
                yield from stream
            return
        rng = random.Random(reader_seed(self.config.seed, self.slot, "mixture"))
        indices = range(len(self.streams))
        for _ in range(self.draws):  # the draws made before a resume
            rng.choices(indices, weights=self.weights)
        iterators = [iter(stream) for stream in self.streams]
        while True:
            choice = rng.choices(indices, weights=self.weights)[0]
            self.draws += 1
            yield next(iterators[choice])

    def shuffled(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        size = self.config.shuffle_buffer
        if size == 0:
            yield from samples
            return
        rng = random.Random(reader_seed(self.config.seed, self.slot, f"shuffle/{self.draws}"))
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            index = rng.randrange(size)
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """A training example from a raw sample, or None (counted and logged) when it is unusable."""
        key, shard = raw.get("__key__"), raw.get("__shard__")
        # Crops and flips are drawn per sample from its place in this reader's stream, so a resumed
        # run augments the samples after its checkpoint as the uninterrupted run would have.
        self.augment.rng.seed(self.augment_seed + self.decoded)
        self.decoded += 1
        try:
            image = self.read_pixels(raw)  # (3, H, W) or (T, 3, H, W) uint8
            meta = json.loads(raw["json"]) if "json" in raw else {}
            caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
            text = caption if self.config.text_field == "txt" else meta[self.config.text_field]
            box = meta.get(self.config.box_field) if self.config.box_field else None
            out = self.augment(image, box)
        except Exception as error:  # noqa: BLE001 - any undecodable sample is skipped the same way
            self.warn("corrupt_samples", f"sample {key} of {shard} skipped: {type(error).__name__}: {error}")
            return None
        if out.flipped:
            text, meta = mirror_texts(text), mirror_texts(meta)
        if out.box is not None:
            meta = {**meta, self.config.box_field: out.box}
        return {"image": out.image, "text": str(text), "meta": meta, "key": key}

    def read_pixels(self, raw: dict[str, Any]) -> torch.Tensor:
        """The sample's image (3, H, W), or with `frames` set its clip (T, 3, H, W); raises when unreadable."""
        if self.config.frames:
            # The frames are drawn from the augmentation's generator, seeded per sample: a resumed run
            # samples the same frames as the uninterrupted one would have.
            return decode_clip(raw, self.config.frames, train=self.config.augment != "eval", rng=self.augment.rng)
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if extension is None:
            raise ValueError(f"no image file ({', '.join(IMAGE_EXTENSIONS)}) among {sorted(raw)}")
        return decode_rgb(raw[extension])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [example["text"] for example in examples]
        meta = [example["meta"] for example in examples]
        size = self.config.image_size
        frames = (self.config.frames,) if self.config.frames else ()
        images = torch.empty(len(examples), *frames, size, size, 3, dtype=torch.uint8)  # (B, [T,] S, S, 3)
        for row, example in enumerate(examples):
            images[row].copy_(example["image"].movedim(-3, -1))  # each image is channels-last: a plain copy
        batch = {
            "images": images.movedim(-1, -3),  # (B, [T,] 3, S, S) uint8, channels-last memory
            "texts": texts,
            "meta": meta,
            "keys": [example["key"] for example in examples],
        }
        if self.tokenizer is not None:
            batch.update(tokenize(self.tokenizer, texts, self.config.max_text_length, self.config.pad_to_max))
        if all("image_id" in m for m in meta):
            ids = [m["image_id"] for m in meta]
            if all(isinstance(i, int) for i in ids):
                batch["image_ids"] = torch.tensor(ids)
        return batch

    def batches(self) -> Iterator[dict[str, Any]]:
        examples: list[dict[str, Any]] = []
        for raw in self.shuffled(self.raw_samples()):
            example = self.decode(raw)
            if example is None:
                continue
            examples.append(example)
            if len(examples) == self.config.batch_size:
                yield self.finish(examples)
                examples = []
        if examples:  # the tail of an epoch pass
            yield self.finish(examples)
        yield {"position": self.position(), "stats": dict(self.stats), "end": True}  # counts after the last batch

    def finish(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.stats["samples"] += len(examples)
        return {**self.collate(examples), "position": self.position(), "stats": dict(self.stats)}


class ShardDataset(IterableDataset):
    """Batches for one rank; each dataloader worker runs its own `Reader`."""

    def __init__(self, sources: list[Source], config: LoaderConfig, tokenizer, rank: int, world_size: int,
                 positions: dict[int, dict[str, Any]]):
        self.sources, self.config, self.tokenizer = sources, config, tokenizer
        self.rank, self.world_size, self.positions = rank, world_size, positions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = self.rank * workers + worker
        reader = Reader(self.sources, self.config, self.tokenizer, slot, self.world_size * workers,
                        self.positions.get(slot))
        yield from reader.batches()


class ShardLoader:
    """Iterable of collated batches with a resumable position and counts of what was skipped."""

    def __init__(self, data: str | list[str] | list[Source], config: LoaderConfig, tokenizer=None,
                 rank: int | None = None, world_size: int | None = None, state: dict[str, Any] | None = None):
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        sources = data if data and isinstance(data, list) and isinstance(data[0], Source) else load_sources(data)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.readers = max(config.workers, 1)
        self.positions: dict[int, dict[str, Any]] = self._positions_from(state)
        self.reader_stats: dict[int, dict[str, int]] = {}
        self.dataset = ShardDataset(sources, config, tokenizer, rank, world_size, dict(self.positions))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers fork after the tokenizer exists
        self.dataloader = DataLoader(
            self.dataset, batch_size=None, num_workers=config.workers,
            generator=torch.Generator().manual_seed(reader_seed(config.seed, rank, "torch")),
            persistent_workers=False, prefetch_factor=4 if config.workers else None,
        )

    def _positions_from(self, state: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
        if not state:
            return {}
        layout = (self.world_size, self.readers, self.config.seed)
        saved = (state.get("world_size"), state.get("readers"), state.get("seed"))
        if saved != layout:
            log.warning(
                "loader state was recorded with world size %s, %s readers per rank and seed %s; this run has %s, "
                "%s and %s: positions do not carry over, the streams start afresh", *saved, *layout)
            return {}
        return {int(slot): position for slot, position in state.get("positions", {}).items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataloader:
            position = batch.pop("position")
            self.positions[position["slot"]] = position
            self.reader_stats[position["slot"]] = batch.pop("stats")
            if not batch.pop("end", False):
                yield batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: what a checkpoint saves and `state=` resumes from (JSON-serialisable)."""
        return {"world_size": self.world_size, "readers": self.readers, "seed": self.config.seed,
                "rank": self.rank, "positions": {str(slot): p for slot, p in self.positions.items()}}

    @property
    def stats(self) -> dict[str, int]:
        """Samples delivered, corrupt samples and bad shards skipped, summed over this rank's readers."""
        total: Counter[str] = Counter()
        for counts in self.reader_stats.values():
            total.update(counts)
        return {"samples": 0, "corrupt_samples": 0, "bad_shards": 0, **total}
