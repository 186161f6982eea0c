"""`mplug data download-videos`: a video URL list -> webdataset shards, one Ray task per shard.

    summary = download_videos(VideoDownloadOptions("webvid/train.parquet", "shards/", shard_size=1000))

img2dataset fetches only images, so videos have their own Ray job. The URL list (parquet, csv,
tsv or json, checked as `mplug data download` checks it: `url` and `caption` columns, optionally
`key`; any other column is copied into each sample's KEY.json) is cut into shards of
`shard_size` rows, numbered on from file to file as img2dataset numbers them. Each shard is one
Ray task (`video_shard.fetch_shard`), which writes `DIR/NNNNN.tar` and `DIR/NNNNN_stats.json`.

- Ray: a new local one with `processes` CPUs, the cluster at `ray_address`, or, inside a Ray job,
  the job's cluster (`download.ray_session`, shared with the image download).
- Incremental: a shard whose stats file exists is done; a rerun fetches only the others.
- Retries: the tasks run with Ray's own retries off (`max_retries=0`), so a task that raised or
  whose worker died comes back to this driver, which submits it again, `retries` times, then
  reports it under `incomplete_shards` with its last error. Rows without a key get
  img2dataset's (shard number, then row number in the shard).
- At the end `DIR/summary.json` (over every shard in DIR; `this_run` for this call) and
  `DIR/manifest.json` (the tar shards and their video counts, for the loaders), also when the run
  fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import fsspec

from data_prep.download import (
    DEFAULT_PROCESSES,
    INPUT_FORMATS,
    SUMMARY_NAME,
    DownloadInputError,
    DownloadOptions,
    Progress,
    RayTiming,
    UrlList,
    check_output_folder,
    inspect_url_list,
    ray_session,
)
from data_prep.download_summary import (
    SHARD_NAME,
    build_summary,
    format_summary,
    read_shard_stats,
    shard_list,
)
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_writer import write_json
from data_prep.video_fetch import FetchSettings
from data_prep.video_shard import ShardTask, fetch_shard, remove_leftovers

logger = logging.getLogger(__name__)

TASKS_PER_CPU = 2  # shard tasks queued per cluster CPU: enough to keep every CPU busy, no more rows in flight
ERROR_CHARS = 500  # of a failed shard's last error, kept in the summary


@dataclass
class VideoDownloadOptions:
    """What `download_videos` fetches, where to, and how; the CLI's flags one to one."""

    url_list: str  # a file, or a folder of files of one format; a local path or an fsspec URL
    output: str  # folder for the shards, a local path or an fsspec URL every worker can reach
    input_format: str | None = None  # one of download.INPUT_FORMATS; None: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    key_col: str = "key"  # used when the list has it; '.' and '/' in a key become '_'
    shard_size: int = 1000  # rows per shard
    processes: int = DEFAULT_PROCESSES  # CPUs of a local Ray = shards fetched at once
    threads: int = 16  # downloads in flight per shard
    timeout: float = 10.0  # seconds to connect, and for each read
    url_retries: int = 2  # extra tries of a URL that timed out or answered 5xx / 429
    retries: int = 2  # extra submissions of a shard task that raised or whose worker died
    max_bytes: int = 100 * 2**20  # a bigger video is not fetched
    backoff: float = 1.0  # seconds before a URL's first retry, doubled for each next
    ray_address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: local
    progress: bool = True

    def validate(self) -> None:
        for name in ("shard_size", "processes", "threads", "timeout", "max_bytes"):
            if getattr(self, name) <= 0:
                raise DownloadInputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("retries", "url_retries", "backoff"):
            if getattr(self, name) < 0:
                raise DownloadInputError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise DownloadInputError(f"input format {self.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")

    @property
    def fetch_settings(self) -> FetchSettings:
        return FetchSettings(self.timeout, self.max_bytes, self.url_retries, self.backoff)


# ---------------------------------------------------------------------------------------------
# The URL list, cut into shards
# ---------------------------------------------------------------------------------------------


class ShardRows:
    """The URL list read once; `rows(shard)` gives a shard's rows as the task's dicts."""

    def __init__(self, options: VideoDownloadOptions, urls: UrlList):
        import pandas as pd

        self.options = options
        fs = fsspec.core.url_to_fs(options.url_list)[0]
        self.frames: list[pd.DataFrame] = []
        self.spans: list[tuple[int, int, int]] = []  # shard -> (frame, first row, end row)
        for path in urls.files:
            with fs.open(path, "rb") as handle:
                frame = _read_frame(handle, urls.input_format, options)
            for start in range(0, len(frame), options.shard_size):
                self.spans.append((len(self.frames), start, min(start + options.shard_size, len(frame))))
            self.frames.append(frame)
        self.key_digits = len(str(options.shard_size - 1))
        self._check_keys()

    def __len__(self) -> int:
        return len(self.spans)

    def rows(self, shard: int) -> list[dict[str, Any]]:
        frame_index, start, end = self.spans[shard]
        part = self.frames[frame_index].iloc[start:end]
        part = part.astype(object).where(part.notna(), None)  # NaN is no JSON value
        options, rows = self.options, []
        for index, record in enumerate(part.to_dict("records")):
            row = {str(k): v for k, v in record.items()}
            row["url"] = row.pop(options.url_col)
            row["caption"] = row.pop(options.caption_col)
            key = row.pop(options.key_col, None)
            row["key"] = _key(key) if key is not None else f"{SHARD_NAME.format(shard)}{index:0{self.key_digits}d}"
            rows.append(row)
        return rows

    def _check_keys(self) -> None:
        keys = Counter(_key(k) for frame in self.frames if self.options.key_col in frame
                       for k in frame[self.options.key_col].dropna())
        repeated = [key for key, count in keys.items() if count > 1]
        if repeated:
            raise DownloadInputError(
                f"URL list {self.options.url_list} repeats {len(repeated)} keys of its "
                f"{self.options.key_col!r} column (e.g. {repeated[:5]}); a key names one sample in "
                "the shards: make them unique, or drop the column to number the rows"
            )


def _read_frame(handle, input_format: str, options: VideoDownloadOptions):
    import pandas as pd

    if input_format == "parquet":
        return pd.read_parquet(handle)
    if input_format == "json":
        return pd.read_json(handle)
    text = {options.url_col: str, options.caption_col: str, options.key_col: str}
    return pd.read_csv(handle, sep="\t" if input_format == "tsv" else ",", dtype=text)


def _key(value: Any) -> str:
    """A URL list's key as a tar member name: webdataset splits names at the first '.'."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer column with gaps reads as floats
    return str(value).replace(".", "_").replace("/", "_")


def check_output(options: VideoDownloadOptions) -> None:
    """The output must be a folder every worker can write, holding shards of this shard size."""
    check_output_folder(options.output, options.shard_size, unit="rows")


# ---------------------------------------------------------------------------------------------
# The Ray job
# ---------------------------------------------------------------------------------------------


class VideoProgress(Progress):
    """The image download's progress line, counting videos."""

    def line(self) -> str:
        return super().line().replace("images", "videos")


def run_shards(options: VideoDownloadOptions, source: ShardRows, missing: list[int],
               retried: list[int]) -> dict[int, str]:
    """Run the shard tasks of `missing` on Ray, submitting a failed one again up to
    `options.retries` times; returns the last error of each shard that never finished."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(fetch_shard)
    limit = max(1, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    queue, running = deque(missing), {}
    failures: Counter[int] = Counter()
    errors: dict[int, str] = {}
    while queue or running:
        while queue and len(running) < limit:
            shard = queue.popleft()
            shard_task = ShardTask(shard, source.rows(shard), options.output, options.fetch_settings, options.threads)
            running[task.remote(shard_task)] = shard
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            shard = running.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:  # the task raised (RayTaskError) or its worker died
                failures[shard] += 1
                cause = getattr(error, "cause", None) or error
                errors[shard] = f"{type(cause).__name__}: {cause}"[:ERROR_CHARS]
                if failures[shard] <= options.retries:
                    logger.warning("shard %d failed (%s): retry %d of %d", shard, errors[shard].splitlines()[0],
                                   failures[shard], options.retries)
                    if shard not in retried:
                        retried.append(shard)
                    queue.append(shard)
                continue
            errors.pop(shard, None)
    return errors


def download_videos(options: VideoDownloadOptions) -> dict:
    """Download the URL list's videos into webdataset shards; returns the summary also written to
    `OUTPUT/summary.json`. Shards still incomplete after the retries are listed under
    `incomplete_shards` with their errors under `shard_errors` (the CLI then exits 1)."""
    started = time.perf_counter()
    options.validate()
    urls = inspect_url_list(DownloadOptions(options.url_list, options.output, input_format=options.input_format,
                                            url_col=options.url_col, caption_col=options.caption_col))
    expected = urls.shard_count(options.shard_size)
    check_output(options)
    before = read_shard_stats(options.output)
    remove_leftovers(options.output)
    missing = sorted(set(range(expected)) - set(before))
    retried: list[int] = []
    errors: dict[int, str] = {}
    ray_timing = RayTiming()
    source = ShardRows(options, urls) if missing else None  # reads the list: its errors come before Ray
    if source is not None:
        if len(source) != expected:  # pandas parsed a CSV otherwise than pyarrow counted its rows
            expected = len(source)
            missing = sorted(set(range(expected)) - set(before))
        fs, root = fsspec.core.url_to_fs(options.output)
        fs.makedirs(root, exist_ok=True)
    try:
        if source is not None:
            with ray_session(options.ray_address, options.processes) as ray_timing:
                progress = (VideoProgress(options.output, expected, before) if options.progress
                            else contextlib.nullcontext())
                with progress:
                    errors = run_shards(options, source, missing, retried)
        else:
            logger.info("all %d shards in %s are complete: nothing to download", expected, options.output)
    finally:
        remove_leftovers(options.output)
        stats = read_shard_stats(options.output)
        summary = build_summary(
            stats, expected_shards=expected, fetched=set(stats) - set(before), retried=sorted(retried),
            seconds=time.perf_counter() - started,
            ray_seconds=(ray_timing.start_seconds, ray_timing.stop_seconds),
            source=options.url_list, input_format=urls.input_format, shard_size=options.shard_size,
            media="video", timeout=options.timeout, max_bytes=options.max_bytes,
            shard_errors={str(shard): error for shard, error in sorted(errors.items()) if shard not in stats},
        )
        summary["this_run"]["videos_per_second"] = summary["this_run"].pop("images_per_second")
        _write_results(options, summary, stats)
    if summary["incomplete_shards"]:
        logger.error("shards %s are still incomplete after %d retries (errors in %s/%s under shard_errors); "
                     "run the same command again to retry only them", shard_list(summary["incomplete_shards"]),
                     options.retries, options.output, SUMMARY_NAME)
    return summary


def _write_results(options: VideoDownloadOptions, summary: dict, stats: dict) -> None:
    output = options.output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    write_json(f"{output}/{SUMMARY_NAME}", summary)
    shards = [ShardInfo(f"{output}/{SHARD_NAME.format(shard)}.tar", stats[shard].successes) for shard in sorted(stats)]
    write_manifest(output, shards, source=options.url_list, media="video")


def format_video_summary(summary: dict) -> str:
    """The image download's table (download_summary.format_summary), counting videos."""
    run = summary["this_run"]
    shown = {**summary, "this_run": {**run, "images_per_second": run["videos_per_second"]}}
    table = format_summary(shown).replace("images", "videos")
    return table + "".join(f"\n  shard {shard}: {error.splitlines()[0]}" for shard, error in summary["shard_errors"].items())

