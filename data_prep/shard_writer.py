"""Writing samples into webdataset shards of img2dataset's layout: `KEY.jpg`, `KEY.txt`, `KEY.json`.

Every producer of shards (the converters, the synthetic data set) writes through `ShardWriter`,
so one loader reads them all. Output may be a local directory or any fsspec URL.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import webdataset as wds

SHARD_PATTERN = "{:05d}.tar"
VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv", "mov")  # the containers video shards may hold
MEDIA_EXTENSIONS = ("jpg", "png", *VIDEO_EXTENSIONS)


@dataclass
class Sample:
    """One record of a shard. `media` holds the encoded file bytes under its extension (jpg, mp4)."""

    key: str
    media: bytes
    extension: str = "jpg"
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class ShardWriter:
    """Writes `Sample`s into `OUTPUT/00000.tar, 00001.tar, ...`, at most `shard_size` samples each.

    Use as a context manager; `shards` lists the written shard URLs once it is closed.
    """

    def __init__(self, output: str, shard_size: int = 10000, prefix: str = ""):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.output = str(output).rstrip("/")
        self.shard_size = shard_size
        self.prefix = prefix
        self.shards: list[str] = []
        self.count = 0
        self._fs, self._root = fsspec.core.url_to_fs(self.output)
        self._fs.makedirs(self._root, exist_ok=True)
        self._stream = None
        self._tar: wds.TarWriter | None = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self._close_current()
        name = self.prefix + SHARD_PATTERN.format(len(self.shards))
        url = f"{self.output}/{name}"
        self._stream = self._fs.open(f"{self._root}/{name}", "wb")
        self._tar = wds.TarWriter(self._stream, encoder=False)
        self.shards.append(url)
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self._tar = self._stream = None

    def write(self, sample: Sample) -> None:
        if sample.extension not in MEDIA_EXTENSIONS:
            raise ValueError(f"media extension {sample.extension!r} is not one of {MEDIA_EXTENSIONS}")
        if "." in sample.key:
            raise ValueError(f"sample key {sample.key!r} contains a dot; webdataset splits keys at the first dot")
        if self._tar is None or self._in_shard >= self.shard_size:
            self._open_next()
        record = {
            "__key__": sample.key,
            sample.extension: sample.media,
            "txt": sample.text.encode("utf-8"),
            "json": json.dumps({"key": sample.key, **sample.meta}).encode("utf-8"),
        }
        self._tar.write(record)
        self._in_shard += 1
        self.count += 1

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_jpeg(image, quality: int = 95) -> bytes:
    """A PIL image as JPEG bytes (RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_json(url: str, payload: Any) -> None:
    """A JSON file at a local path or fsspec URL."""
    with fsspec.open(url, "w") as handle:
        json.dump(payload, handle, indent=2)
