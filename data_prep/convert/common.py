"""The two ends every converter shares: reading annotation files and media, writing split shards.

A converter opens one `Conversion`, walks its records inside `run.record(file, label)` (see
`report.py`), reads each record's image or video with `run.image` / `run.video` and hands the
finished samples to `run.write(split, samples, ident)`. `run.finish()` then leaves

    OUTPUT/<split>/00000.tar ...     shards of `KEY.jpg|mp4|avi|webm`, `KEY.txt`, `KEY.json`
    OUTPUT/<split>/manifest.json     count, task, split, format, shard list
    OUTPUT/splits.json               {split: {"count": samples, "ids": [image/question/ref/video ids]}}
    OUTPUT/report.json               converted per split, skipped per reason, the first problems

Images are copied byte for byte when they are JPEG and re-encoded to JPEG otherwise; videos are
copied as they are. `limit` caps the samples written to each split, for quick runs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from data_prep.convert.report import (
    BAD_MEDIA,
    DUPLICATE,
    MISSING_MEDIA,
    ConvertReport,
    InputError,
    ProblemLog,
    RecordProblem,
    need,
)
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_writer import VIDEO_EXTENSIONS, Sample, ShardWriter, encode_jpeg, write_json

JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_SHARD_SIZE = 1000
PROBLEMS_KEPT = 100


def read_json(path: Path, expected: str) -> Any:
    """A JSON file; `expected` describes its shape for the error when it cannot be read."""
    try:
        with Path(path).open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; expected {expected}") from None
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error}); expected {expected}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); expected {expected}") from None


def top_list(payload: Any, key: str | None, path: Path, expected: str) -> list[Any]:
    """The record list of a file: `payload[key]`, or `payload` itself when `key` is None."""
    if key is None:
        found, problem = payload, f"the top level is a {type(payload).__name__}, not a list"
    elif isinstance(payload, dict):
        found = payload.get(key)
        problem = (f"it has no {key!r} (keys {sorted(payload)[:8]})" if key not in payload
                   else f"{key!r} is a {type(found).__name__}, not a list")
    else:
        found, problem = None, f"the top level is a {type(payload).__name__}, not an object with {key!r}"
    if not isinstance(found, list):
        raise InputError(f"{path}: {problem}; expected {expected}")
    return found


def sentences(records: list[Any], id_key: str, text_key: str) -> list[tuple[int, str]]:
    """(id, stripped text) of each sentence record of an image or ref; a problem names a bad one."""
    found = []
    for position, record in enumerate(records):
        try:
            sent_id = need(record, id_key, int)
            text = need(record, text_key, str).strip()
        except RecordProblem as problem:
            raise RecordProblem(f"sentences[{position}]: {problem.message}") from None
        if not text:
            raise RecordProblem(f"sentences[{position}] ({id_key} {sent_id}): {text_key!r} is blank")
        found.append((sent_id, text))
    return found


def caption_samples(
    split: str, key: str, media: tuple[bytes, str], captions: list[tuple[int | str, str]], meta: dict[str, Any]
) -> list[Sample]:
    """The caption layout: in train one sample per caption, elsewhere one per image or video.

    `captions` holds (sentence id, caption); every sample's json carries all of them as `captions`.
    """
    data, extension = media
    texts = [text for _, text in captions]
    meta = {**meta, "captions": texts, "split": split}
    if split != "train":
        return [Sample(key, data, extension, texts[0], meta)]
    return [Sample(f"{key}_{sent_id}", data, extension, text, {**meta, "sent_id": sent_id})
            for sent_id, text in captions]


class Conversion:
    """One converter run: media lookup, per-split shard writers, problem accounting."""

    def __init__(
        self,
        format: str,
        task: str,
        output: str | Path,
        image_root: str | Path | Sequence[str | Path],
        *,
        strict: bool = False,
        shard_size: int = DEFAULT_SHARD_SIZE,
        limit: int | None = None,
        max_problems: int = PROBLEMS_KEPT,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 sample per split, got {limit}")
        roots = [image_root] if isinstance(image_root, (str, Path)) else list(image_root)
        self.roots = [Path(root) for root in roots]
        for root in self.roots:
            if not root.is_dir():
                raise InputError(f"media root {root} is not a directory; expected the folder of the images or videos")
        self.format = format
        self.task = task
        self.output = Path(output)
        self.shard_size = shard_size
        self.limit = limit
        self.log = ProblemLog(strict, max_problems)
        self.record = self.log.record
        self._writers: dict[str, ShardWriter] = {}
        self._ids: dict[str, dict[Any, None]] = {}  # split -> ids in order met (dict as ordered set)
        self._keys: dict[str, set[str]] = {}
        self._last_media: tuple[Path, tuple[bytes, str]] | None = None

    # ---- media -------------------------------------------------------------------------------

    def find(self, relative: str, kind: str = "image") -> Path:
        for root in self.roots:
            path = root / relative
            if path.is_file():
                return path
        roots = ", ".join(str(root) for root in self.roots)
        raise RecordProblem(f"{kind} {relative} not found under {roots}", MISSING_MEDIA)

    def image(self, relative: str) -> tuple[bytes, str]:
        """The image's JPEG bytes (the file's own when it is a JPEG) and the extension 'jpg'."""
        path = self.find(relative, "image")
        if self._last_media and self._last_media[0] == path:  # questions of one image come together
            return self._last_media[1]
        data = path.read_bytes()
        if not data.startswith(JPEG_MAGIC):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    data = encode_jpeg(image)
            except (UnidentifiedImageError, OSError) as error:
                raise RecordProblem(f"image {path} cannot be decoded ({error})", BAD_MEDIA) from None
        return self._remember(path, (data, "jpg"))

    def video(self, relative: str) -> tuple[bytes, str]:
        """The video file's bytes and its extension (mp4, avi or webm), undecoded."""
        path = self.find(relative, "video")
        extension = path.suffix.lower().lstrip(".")
        if extension not in VIDEO_EXTENSIONS:
            raise RecordProblem(f"video {path} has extension {extension!r}; expected one of {VIDEO_EXTENSIONS}", BAD_MEDIA)
        if self._last_media and self._last_media[0] == path:
            return self._last_media[1]
        return self._remember(path, (path.read_bytes(), extension))

    def _remember(self, path: Path, media: tuple[bytes, str]) -> tuple[bytes, str]:
        self._last_media = (path, media)
        return media

    # ---- output ------------------------------------------------------------------------------

    def full(self, split: str) -> bool:
        """True once `limit` samples went into `split`: the caller can skip reading its records."""
        writer = self._writers.get(split)
        return self.limit is not None and writer is not None and writer.count >= self.limit

    def write(self, split: str, samples: list[Sample], ident: Any) -> None:
        """Write one record's samples to `split`; `ident` is the id listed in splits.json."""
        keys = self._keys.setdefault(split, set())
        for sample in samples:
            if "." in sample.key:
                raise RecordProblem(f"sample key {sample.key!r} contains a dot; ids must not")
            if sample.key in keys:
                raise RecordProblem(f"sample key {sample.key!r} was already written to {split}", DUPLICATE)
        if split not in self._writers:
            self._writers[split] = ShardWriter(str(self.output / split), self.shard_size)
            self._ids[split] = {}
        writer = self._writers[split]
        for sample in samples:
            if self.limit is not None and writer.count >= self.limit:
                break
            writer.write(sample)
            keys.add(sample.key)
        self._ids[split][ident] = None

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

    def finish(self) -> ConvertReport:
        """Close the shards and write the manifests, splits.json and report.json."""
        self.close()
        self.output.mkdir(parents=True, exist_ok=True)
        splits = {}
        for split, writer in self._writers.items():
            counts = [min(self.shard_size, writer.count - i * self.shard_size) for i in range(len(writer.shards))]
            shards = [ShardInfo(url, count) for url, count in zip(writer.shards, counts, strict=True)]
            write_manifest(str(self.output / split), shards, task=self.task, split=split, format=self.format)
            splits[split] = {"count": writer.count, "ids": list(self._ids[split])}
        write_json(str(self.output / "splits.json"), splits)
        report = ConvertReport(
            format=self.format,
            output=str(self.output),
            converted={split: writer.count for split, writer in self._writers.items()},
            skipped=dict(self.log.counts),
            problems=list(self.log.problems),
        )
        write_json(str(self.output / "report.json"), report.to_json())
        return report

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
