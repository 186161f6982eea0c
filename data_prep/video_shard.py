"""One shard of a video URL list -> `DIR/NNNNN.tar` + `DIR/NNNNN_stats.json`: the Ray task of download-videos.

    stats = fetch_shard(ShardTask(shard=3, rows=[{"url": ..., "caption": ..., "key": ...}, ...],
                                  output="shards/", settings=FetchSettings(), threads=16))

The rows are fetched `threads` at a time (`video_fetch.fetch`), each body checked with PyAV
(`video_fetch.probe_video`), and every good video written, as it arrives, into the shard in
webdataset layout:

    KEY.mp4 (or .webm, .mkv, .mov, .avi: the container's own)   the bytes as served
    KEY.txt                                                     the caption
    KEY.json    url, caption, key, status, duration, frames, width, height, codec, bytes,
                and the URL list's other columns

A failed row costs only itself: its reason is counted in the stats (`status_dict`, the layout of
img2dataset's stats that download_summary.py reads) and listed under `failed_samples` with its
URL and message. The tar and then the stats are written under temporary names and renamed when
complete, so a worker killed mid-shard leaves no half shard, and a shard counts as done exactly
when its stats file exists.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec

from data_prep.download_summary import SHARD_NAME, STATS_SUFFIX, SUCCESS
from data_prep.video_fetch import FetchFailure, FetchSettings, VideoInfo, fetch, probe_video

TMP_MARK = ".tmp-"  # NNNNN.tar.tmp-<hex>: a shard being written; never matches *.tar or *_stats.json
UNEXPECTED = "unexpected_error"  # a row that raised something no reason names (a bug: see its message)
IN_FLIGHT_PER_THREAD = 2  # fetched bodies waiting to be written, per thread, at most


@dataclass(frozen=True)
class ShardTask:
    shard: int
    rows: list[dict[str, Any]]  # url, caption, key and the URL list's other columns
    output: str  # folder, a path or an fsspec URL every worker can write
    settings: FetchSettings
    threads: int


@dataclass(frozen=True)
class Outcome:
    row: dict[str, Any]
    data: bytes = b""
    info: VideoInfo | None = None
    failure: FetchFailure | None = None


def fetch_one(row: dict[str, Any], settings: FetchSettings) -> Outcome:
    """A row's video, or why there is none; never raises."""
    try:
        url = row.get("url")
        if not isinstance(url, str) or not url.strip():
            raise FetchFailure("invalid_url", f"the URL is {url!r}")
        data = fetch(url.strip(), settings)
        return Outcome(row, data, probe_video(data, url))
    except FetchFailure as failure:
        return Outcome(row, failure=failure)
    except Exception as error:  # noqa: BLE001 - one row's surprise must not cost the shard
        return Outcome(row, failure=FetchFailure(UNEXPECTED, f"{type(error).__name__}: {error}"))


def fetch_all(rows: list[dict[str, Any]], settings: FetchSettings, threads: int) -> Iterator[Outcome]:
    """Every row's outcome, in the order they finish, with at most IN_FLIGHT_PER_THREAD * threads
    bodies held in memory at once."""
    limit = max(1, threads) * IN_FLIGHT_PER_THREAD
    pending = iter(rows)
    running: set[Future[Outcome]] = set()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fetch") as pool:
        while True:
            for row in pending:
                running.add(pool.submit(fetch_one, row, settings))
                if len(running) >= limit:
                    break
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _record(outcome: Outcome) -> dict[str, Any]:
    """The tar members of a fetched video: KEY.<ext>, KEY.txt, KEY.json."""
    row, info = outcome.row, outcome.info
    meta = {**row, "status": SUCCESS, "duration": info.duration, "frames": info.frames,
            "width": info.width, "height": info.height, "codec": info.codec, "bytes": len(outcome.data)}
    return {
        "__key__": row["key"],
        info.extension: outcome.data,
        "txt": (row.get("caption") or "").encode("utf-8"),
        "json": _json_bytes(meta),
    }


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, default=str).encode("utf-8")  # default: timestamps of a parquet list


def fetch_shard(task: ShardTask) -> dict[str, Any]:
    """Fetch one shard's rows into `OUTPUT/NNNNN.tar` and `OUTPUT/NNNNN_stats.json`; returns the stats."""
    import webdataset as wds

    fs, root = fsspec.core.url_to_fs(task.output.rstrip("/"))
    fs.makedirs(root, exist_ok=True)  # the driver made it; a worker on another node may not see it yet
    name = SHARD_NAME.format(task.shard)
    token = secrets.token_hex(4)
    tar_path, stats_path = f"{root}/{name}.tar", f"{root}/{name}{STATS_SUFFIX}"
    tmp_tar, tmp_stats = tar_path + TMP_MARK + token, stats_path + TMP_MARK + token
    start = time.time()
    status: Counter[str] = Counter()
    failed: list[dict[str, Any]] = []
    try:
        with fs.open(tmp_tar, "wb") as stream:
            tar = wds.TarWriter(stream, encoder=False)
            for outcome in fetch_all(task.rows, task.settings, task.threads):
                if outcome.failure is None:
                    tar.write(_record(outcome))
                    status[SUCCESS] += 1
                    continue
                status[outcome.failure.reason] += 1
                failed.append({"key": outcome.row.get("key"), "url": outcome.row.get("url"),
                               "reason": outcome.failure.reason, "message": outcome.failure.message})
            tar.close()
        _publish(fs, tmp_tar, tar_path)
        end = time.time()
        stats = {
            "count": len(task.rows), "successes": status[SUCCESS], "failed": len(task.rows) - status[SUCCESS],
            "status_dict": dict(status.most_common()), "start_time": start, "end_time": end,
            "duration": end - start, "failed_samples": failed,
        }
        with fs.open(tmp_stats, "wb") as handle:
            handle.write(_json_bytes(stats))
        _publish(fs, tmp_stats, stats_path)
        return stats
    finally:
        for leftover in (tmp_tar, tmp_stats):
            if fs.exists(leftover):
                fs.rm(leftover)


def _publish(fs, tmp: str, final: str) -> None:
    """Rename a finished file into place: atomic on a local disk (os.replace); a copy and delete
    on an object store, where readers see the object only once it is whole anyway."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        os.replace(tmp, final)
    else:
        fs.mv(tmp, final)


def remove_leftovers(output: str) -> list[str]:
    """Delete the temporary files of shards whose worker died mid-write; returns their paths."""
    fs, root = fsspec.core.url_to_fs(output.rstrip("/"))
    if not fs.exists(root):
        return []
    fs.invalidate_cache()
    found = fs.glob(f"{root}/*{TMP_MARK}*")
    for path in found:
        fs.rm(path)
    return found
