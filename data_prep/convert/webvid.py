"""WebVid-2M / WebVid-10M's released CSVs -> URL lists that `mplug data download-videos` reads.

Input, as released: `results_2M_train.csv`, `results_2M_val.csv` (or `results_10M_*.csv`), with
the columns `videoid, contentUrl, duration, page_dir, name`: the video's id, its URL, its length
in ISO 8601 (`PT00H00M11S`), the folder of its page and its caption.

Output:

    OUTPUT/train.parquet, OUTPUT/val.parquet    url, caption, key (the videoid), duration
                                                (seconds, null when unreadable), page_dir
    OUTPUT/splits.json                          {split: {"count": rows, "ids": [keys]}}
    OUTPUT/report.json                          rows written per split, skipped per reason

A row with a blank videoid, URL or caption is skipped and reported (`malformed`, with its file
and line), as is a videoid met before (`duplicate`); `strict` stops at the first instead. The
train and val rows come from their own CSVs; without a val CSV, `val_fraction` moves that share
of the train rows to val, chosen by a hash of the videoid, so a row's split never depends on
the order or the number of the files.

    mplug data convert webvid --train results_2M_train.csv --val results_2M_val.csv --output webvid
    mplug data download-videos webvid/train.parquet --output /data/webvid/train
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.convert.report import DUPLICATE, ConvertReport, InputError, ProblemLog, RecordProblem
from data_prep.convert.video import read_csv
from data_prep.shard_writer import write_json

REQUIRED = ("videoid", "contentUrl", "name")
EXPECTED = "a WebVid CSV (videoid, contentUrl, duration, page_dir, name)"
ISO_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")
BATCH_ROWS = 100_000  # rows per parquet row group: a 10M-row list never sits in memory at once
HASH_RANGE = 2**32  # zlib.crc32's
PROBLEMS_KEPT = 100


def convert_webvid(
    output: str | Path,
    *,
    train: Sequence[str | Path] = (),
    val: Sequence[str | Path] = (),
    val_fraction: float | str | None = None,
    strict: bool = False,
    limit: int | None = None,
    max_problems: int = PROBLEMS_KEPT,
) -> ConvertReport:
    """Write `OUTPUT/{train,val}.parquet`, `splits.json` and `report.json` from WebVid CSVs."""
    fraction = _fraction(val_fraction, bool(val))
    if not train and not val:
        raise InputError("no WebVid CSV given; expected train and/or val files (results_2M_train.csv, results_2M_val.csv)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 row per split, got {limit}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    log = ProblemLog(strict, max_problems)
    lists = {split: UrlListWriter(output / f"{split}.parquet") for split in ("train", "val")}
    seen: set[str] = set()
    try:
        for given, paths in (("train", train), ("val", val)):
            for path in map(Path, paths):
                for line, row in read_csv(path, REQUIRED, EXPECTED):
                    with log.record(path.name, f"line {line} (videoid {row.get('videoid')})"):
                        key = _required(row, "videoid")
                        split = "val" if given == "train" and _hashed_share(key) < fraction else given
                        if limit is not None and lists[split].count >= limit:
                            continue
                        url, caption = _required(row, "contentUrl"), _required(row, "name")
                        if key in seen:
                            raise RecordProblem(f"videoid {key} was met before; each video is listed once", DUPLICATE)
                        seen.add(key)
                        lists[split].add(url, caption, key, _seconds(row.get("duration")), row.get("page_dir"))
    finally:
        for writer in lists.values():
            writer.close()
    splits = {split: {"count": writer.count, "ids": writer.keys} for split, writer in lists.items() if writer.count}
    write_json(str(output / "splits.json"), splits)
    report = ConvertReport("webvid", str(output), {split: entry["count"] for split, entry in splits.items()},
                           dict(log.counts), list(log.problems))
    write_json(str(output / "report.json"), report.to_json())
    return report


class UrlListWriter:
    """A parquet URL list written in row groups of BATCH_ROWS; no file when no row came."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.keys: list[str] = []
        self._batch: dict[str, list[Any]] = {name: [] for name in ("url", "caption", "key", "duration", "page_dir")}
        self._writer = None

    def add(self, url: str, caption: str, key: str, duration: float | None, page_dir: str | None) -> None:
        for name, value in zip(self._batch, (url, caption, key, duration, page_dir), strict=True):
            self._batch[name].append(value)
        self.keys.append(key)
        self.count += 1
        if len(self._batch["key"]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._batch["key"]:
            return
        schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                            ("duration", pa.float64()), ("page_dir", pa.string())])
        table = pa.table(self._batch, schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, schema)
        self._writer.write_table(table)
        self._batch = {name: [] for name in self._batch}

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _required(row: dict[str, Any], column: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise RecordProblem(f"{column!r} is blank")
    return value


def _seconds(text: str | None) -> float | None:
    """'PT00H01M05S' -> 65.0; None for anything else."""
    match = ISO_DURATION.match((text or "").strip())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _hashed_share(key: str) -> float:
    """A stable number in [0, 1) for a key: the same on every machine and Python run."""
    return zlib.crc32(key.encode("utf-8")) / HASH_RANGE


def _fraction(value: float | str | None, have_val: bool) -> float:
    if value is None:
        return 0.0
    try:
        fraction = float(value)
    except ValueError:
        raise InputError(f"val fraction {value!r} is not a number; give a share such as 0.01") from None
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"val fraction must be in [0, 1), got {fraction}")
    if have_val and fraction:
        raise InputError("give val CSVs or a val fraction of the train rows, not both")
    return fraction
