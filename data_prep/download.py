"""`mplug data download`: a URL list -> webdataset shards, by img2dataset on Ray, with a summary.

    summary = download(DownloadOptions("urls.parquet", "shards/", image_size=256))

img2dataset (distributor="ray", output_format="webdataset", incremental_mode="incremental")
writes `DIR/00000.tar, ...` holding `KEY.jpg`, `KEY.txt` (the caption) and `KEY.json` (url,
status, sizes), a `NNNNN_stats.json` for every shard it finished and `NNNNN.parquet` with every
sample's outcome. Around that this module

- checks the URL list first (its format, the url and caption columns, that it has rows), so bad
  input fails before any Ray worker starts, with an error naming what is there;
- starts a local Ray (`ray.init`) unless given the address of a running cluster, and shuts down
  only a Ray it started;
- retries the shards that have no stats after a pass, `retries` times: img2dataset's Ray
  distributor runs one task per shard and drops a shard that raised; Ray itself re-runs a task
  only when its worker process dies, and gives up after 3 tries;
- prints a progress line while shards finish, and at the end writes `DIR/summary.json` (over
  every shard in DIR, so a rerun reports the totals and, under `this_run`, what it fetched)
  and `DIR/manifest.json` (the tar shards with their sample counts, for the loaders).

Both JSON files are derived from the stats files: they are removed before img2dataset runs
(its incremental mode reads every `DIR/*.json` as a shard's stats) and rewritten afterwards,
also when the run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import fsspec

from data_prep.download_summary import (
    SHARD_NAME,
    ShardStats,
    Totals,
    build_summary,
    read_shard_stats,
    shard_id,
    shard_list,
)
from data_prep.manifest import MANIFEST_NAME, ShardInfo, write_manifest
from data_prep.shard_writer import write_json

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("parquet", "csv", "tsv", "json")
# img2dataset.resizer.ResizeMode, border (its default) first; listed here so that `mplug --help`
# does not import img2dataset (seconds: albumentations, cv2, wandb).
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
SUMMARY_NAME = "summary.json"
DERIVED_FILES = (SUMMARY_NAME, MANIFEST_NAME)
DEFAULT_PROCESSES = max(1, min(8, os.cpu_count() or 1))
# The Ray tasks pass only shard file names and (status, row) tuples: a small object store is
# plenty and spares /dev/shm, which Ray would otherwise size at 30% of the memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# img2dataset imports albumentations, which asks the network for a newer version unless this is set.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}
RAY_JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a job's driver
PROCESS_LOCAL_PROTOCOLS = ("memory",)  # each Ray worker would see its own empty file system


class DownloadInputError(ValueError):
    """The URL list, output folder or an option cannot be used; the message says what would work."""


@dataclass
class DownloadOptions:
    """What `download` fetches, where to, and how; the CLI's flags one to one."""

    url_list: str  # a file, or a folder of files of one format; a local path or an fsspec URL
    output: str  # folder for the shards, a local path or an fsspec URL every worker can reach
    input_format: str | None = None  # one of INPUT_FORMATS; None: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    image_size: int = 256
    resize_mode: str = "border"  # one of RESIZE_MODES
    processes: int = DEFAULT_PROCESSES  # CPUs of a local Ray = shards downloaded at once
    threads: int = 64  # downloads in flight per shard
    shard_size: int = 10000  # samples per shard (img2dataset's number_sample_per_shard)
    timeout: float = 10.0  # seconds per connection and per read
    retries: int = 2  # passes over the shards still without stats after the first
    ray_address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: local
    progress: bool = True  # a progress line on stderr
    verbose: bool = False  # img2dataset's own output to the terminal; else to a log file

    def validate(self) -> None:
        positive = {
            "image_size": self.image_size,
            "processes": self.processes,
            "threads": self.threads,
            "shard_size": self.shard_size,
            "timeout": self.timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise DownloadInputError(f"{name} must be positive, got {value}")
        if self.retries < 0:
            raise DownloadInputError(f"retries must be 0 or more, got {self.retries}")
        if self.resize_mode not in RESIZE_MODES:
            raise DownloadInputError(f"resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise DownloadInputError(
                f"input format {self.input_format!r} is not one of {', '.join(INPUT_FORMATS)}"
            )


# ---------------------------------------------------------------------------------------------
# The URL list and the output folder, checked before anything starts
# ---------------------------------------------------------------------------------------------


@dataclass
class UrlList:
    input_format: str
    files: list[str]  # img2dataset reads them in this (sorted) order
    rows: list[int]  # per file

    def shard_count(self, shard_size: int) -> int:
        """img2dataset numbers the shards of each file on from the last file's."""
        return sum(math.ceil(rows / shard_size) for rows in self.rows)


def _format_of(path: str) -> str | None:
    extension = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return extension if extension in INPUT_FORMATS else None


def _columns_and_rows(fs, path: str, input_format: str, url_col: str) -> tuple[list[str], int]:
    """The column names of one URL list file and its number of rows, read as img2dataset reads it."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        if input_format == "parquet":
            metadata = pq.ParquetFile(handle).metadata
            return list(metadata.schema.names), metadata.num_rows
        if input_format == "json":
            import pandas as pd

            frame = pd.read_json(handle)
            return [str(c) for c in frame.columns], len(frame)
        parse = pa_csv.ParseOptions(delimiter="\t" if input_format == "tsv" else ",")
        columns = list(pa_csv.open_csv(handle, parse_options=parse).schema.names)
    if url_col not in columns:
        return columns, 0
    with fs.open(path, "rb") as handle:  # only the url column, as text: counting rows, no more
        convert = pa_csv.ConvertOptions(include_columns=[url_col], column_types={url_col: pa.string()})
        table = pa_csv.read_csv(handle, parse_options=parse, convert_options=convert)
    return columns, table.num_rows


def inspect_url_list(options: DownloadOptions) -> UrlList:
    """The URL list's files, format and row counts; DownloadInputError if img2dataset could not use it."""
    fs, root = fsspec.core.url_to_fs(options.url_list)
    if not fs.exists(root):
        raise DownloadInputError(f"URL list {options.url_list} does not exist; give a {'/'.join(INPUT_FORMATS)} file or a folder of them")
    input_format = options.input_format
    if fs.isdir(root):
        if input_format is None:
            found = sorted({f for f in (_format_of(p) for p in fs.ls(root, detail=False)) if f})
            if len(found) != 1:
                raise DownloadInputError(
                    f"URL list folder {options.url_list} holds files of the formats {found or 'none'}; "
                    f"it needs exactly one of {', '.join(INPUT_FORMATS)}, or pass --input-format"
                )
            input_format = found[0]
        files = sorted(fs.glob(f"{root.rstrip('/')}/*.{input_format}"))
        if not files:
            raise DownloadInputError(f"URL list folder {options.url_list} has no *.{input_format} file")
    else:
        files = [root]
        input_format = input_format or _format_of(root)
        if input_format is None:
            raise DownloadInputError(
                f"cannot tell the format of URL list {options.url_list} from its extension; "
                f"name it *.parquet, *.csv, *.tsv or *.json, or pass --input-format"
            )
    needed = [options.url_col, options.caption_col]
    rows = []
    for path in files:
        try:
            columns, count = _columns_and_rows(fs, path, input_format, options.url_col)
        except Exception as error:  # pyarrow and pandas raise many kinds for unreadable files
            raise DownloadInputError(f"cannot read URL list {path} as {input_format}: {error}") from None
        missing = [c for c in needed if c not in columns]
        if missing:
            flags = {options.url_col: "--url-col", options.caption_col: "--caption-col"}
            raise DownloadInputError(
                f"URL list {path} has no column {', '.join(repr(c) for c in missing)}; its columns "
                f"are {columns}: name the right ones with {' and '.join(flags[c] for c in missing)}"
            )
        rows.append(count)
    if sum(rows) == 0:
        raise DownloadInputError(f"URL list {options.url_list} has no rows: there is nothing to download")
    return UrlList(input_format, files, rows)


def check_output_folder(output: str, shard_size: int, unit: str = "samples"):
    """(fs, root) of a download's output: a folder every Ray worker can write, holding shards of
    `shard_size` `unit` if an earlier run wrote any."""
    fs, root = fsspec.core.url_to_fs(output)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in PROCESS_LOCAL_PROTOCOLS:
        raise DownloadInputError(
            f"output {output} lives in this process's memory, which Ray workers cannot "
            "write to; give a local path or a shared fsspec URL (file://, s3://, gs://)"
        )
    if fs.exists(root) and not fs.isdir(root):
        raise DownloadInputError(f"output {output} is a file; give a folder for the shards")
    if not fs.exists(root):
        return fs, root
    fs.invalidate_cache()
    previous = f"{root.rstrip('/')}/{SUMMARY_NAME}"
    if fs.exists(previous):
        with fs.open(previous, "r") as handle:
            previous_size = json.load(handle).get("shard_size")
        if previous_size not in (None, shard_size):
            raise DownloadInputError(
                f"{output} holds shards of {previous_size} {unit}, but the shard size is now "
                f"{shard_size}: the shards would not line up with the URL list; pass "
                f"--shard-size {previous_size} or download into a new folder"
            )
    return fs, root


def prepare_output(options: DownloadOptions) -> None:
    """Check the output folder and remove the derived JSON files img2dataset would trip over."""
    fs, root = check_output_folder(options.output, options.shard_size)
    if not fs.exists(root):
        return
    found = {path.rsplit("/", 1)[-1]: path for path in fs.glob(f"{root.rstrip('/')}/*.json")}
    for name in found:
        if name not in DERIVED_FILES and shard_id(name) is None:
            raise DownloadInputError(
                f"{options.output} holds {name}: img2dataset reads every *.json there as a "
                "shard's NNNNN_stats.json; move it away or download into another folder"
            )
    for name in DERIVED_FILES:  # only once nothing can stop the download: they are rewritten after it
        if name in found:
            fs.rm(found[name])


# ---------------------------------------------------------------------------------------------
# Ray and img2dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class RayTiming:
    """Seconds a download spent starting and shutting down its own Ray (0 for one already running)."""

    start_seconds: float = 0.0
    stop_seconds: float = 0.0


def ray_job_env_vars() -> dict[str, str] | None:
    """The environment variables of the Ray job this process is the driver of; None outside a job."""
    config = os.environ.get(RAY_JOB_CONFIG_VARIABLE)
    if config is None:
        return None
    runtime_env = json.loads(config).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


@contextlib.contextmanager
def ray_session(address: str | None, processes: int) -> Iterator[RayTiming]:
    """Ray for the download: the one already initialised in this process, a running cluster at
    `address`, or a new local one with `processes` CPUs. Shuts down (disconnects from) only
    what it started; the yielded timing is complete once the block has ended."""
    import ray

    timing = RayTiming()
    if ray.is_initialized():
        yield timing
        return
    start = time.perf_counter()
    job_env = ray_job_env_vars()
    if job_env is not None and not address:
        address = "auto"  # a Ray job's driver: download on the cluster the job runs on
    try:
        if address:
            # Ray refuses a variable the job's runtime environment already sets, even to the same value.
            env_vars = {key: value for key, value in WORKER_ENV.items() if key not in (job_env or {})}
            ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
        else:
            # The local Ray's workers inherit this environment. A runtime_env would do the same
            # but make Ray discard the workers it starts in advance and start new ones.
            os.environ.update(WORKER_ENV)
            ray.init(
                address="local",  # a new Ray even when RAY_ADDRESS or another Ray is about
                num_cpus=processes,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=True,
            )
    except ConnectionError as error:
        raise ConnectionError(
            f"cannot connect to the Ray cluster at {address} ({error}); start one with "
            "`ray start --head` and give its address, or leave out --ray-address for a local Ray"
        ) from None
    timing.start_seconds = time.perf_counter() - start
    try:
        yield timing
    finally:
        stop = time.perf_counter()
        ray.shutdown()
        timing.stop_seconds = time.perf_counter() - stop


@contextlib.contextmanager
def _stdout_to(log_path: str | None) -> Iterator[None]:
    """Send stdout (this process's and its children's: img2dataset's logger process) to a file."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        try:
            with contextlib.redirect_stdout(log):
                yield
        finally:
            log.flush()
            os.dup2(saved, 1)
            os.close(saved)


def run_img2dataset(options: DownloadOptions, input_format: str, log_path: str | None,
                    distributor: str = "ray") -> None:
    """One img2dataset pass over the URL list; its incremental mode skips shards that have stats.

    Raises ray.exceptions.RayError when a task failed for good (Ray retries a killed worker's
    task itself, 3 times); by then every other task has finished. `distributor` is img2dataset's
    (the benchmark compares with "multiprocessing", all else equal).
    """
    os.environ.update(WORKER_ENV)
    import img2dataset
    from img2dataset.logger import LoggerProcess

    children_before = set(multiprocessing.active_children())
    on_interrupt = signal.getsignal(signal.SIGINT)
    try:
        with _stdout_to(log_path):
            img2dataset.download(
                url_list=options.url_list,
                output_folder=options.output,
                input_format=input_format,
                url_col=options.url_col,
                caption_col=options.caption_col,
                image_size=options.image_size,
                resize_mode=options.resize_mode,
                processes_count=options.processes,
                thread_count=options.threads,
                number_sample_per_shard=options.shard_size,
                timeout=options.timeout,
                output_format="webdataset",
                distributor=distributor,
                incremental_mode="incremental",
                enable_wandb=False,
            )
    except SystemExit:  # img2dataset's own SIGINT handler exits with status 0
        raise KeyboardInterrupt from None
    finally:
        # img2dataset joins its stats-logger process only when the run returns; one left behind
        # by an exception would keep this interpreter from exiting.
        for child in set(multiprocessing.active_children()) - children_before:
            if isinstance(child, LoggerProcess):
                child.join()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_interrupt)  # img2dataset replaced it


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """A thread that polls the output for finished shards and prints one updating line:
    shards done/total, images ok/failed, rate. On a terminal it rewrites the line in place;
    into a file or pipe it writes a line when a shard finished, at most every `quiet_seconds`."""

    def __init__(self, output: str, expected: int, known: dict[int, ShardStats],
                 stream: TextIO = sys.stderr, interval: float = 1.0, quiet_seconds: float = 10.0):
        self.output = output
        self.expected = expected
        self.known = dict(known)
        self.before = set(known)
        self.stream = stream
        self.interval = interval
        self.quiet_seconds = quiet_seconds
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)
        self._tty = stream.isatty()
        self._last_line = ""
        self._last_print = 0.0

    def line(self) -> str:
        self.known.update(read_shard_stats(self.output, skip=set(self.known)))
        totals = Totals.of(list(self.known.values()))
        fetched = sum(s.count for shard, s in self.known.items() if shard not in self.before)
        rate = fetched / max(time.perf_counter() - self.started, 1e-9)
        return (
            f"shards {totals.shards}/{self.expected} | images ok {totals.success} "
            f"failed {totals.failed} | {rate:.1f} images/s"
        )

    def _show(self, final: bool = False) -> None:
        line = self.line()
        if self._tty:
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        elif line != self._last_line and (final or time.perf_counter() - self._last_print >= self.quiet_seconds):
            self.stream.write(line + "\n")
            self._last_line, self._last_print = line, time.perf_counter()
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._show()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show(final=True)


# ---------------------------------------------------------------------------------------------
# The download
# ---------------------------------------------------------------------------------------------


def _missing(output: str, expected: int) -> list[int]:
    return sorted(set(range(expected)) - set(read_shard_stats(output)))


def _remove_leftover_tmp(output: str) -> None:
    """img2dataset's `_tmp` (feather copies of the URL list) outlives a pass that raised."""
    fs, root = fsspec.core.url_to_fs(output)
    tmp = f"{root.rstrip('/')}/_tmp"
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)


def _write_results(options: DownloadOptions, summary: dict, stats: dict[int, ShardStats]) -> None:
    output = options.output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)  # absent when Ray failed to start: the summary says 0 shards
    write_json(f"{output}/{SUMMARY_NAME}", summary)
    shards = [
        ShardInfo(f"{output}/{SHARD_NAME.format(shard)}.tar", stats[shard].successes)
        for shard in sorted(stats)
    ]
    write_manifest(output, shards, source=options.url_list, image_size=options.image_size,
                   resize_mode=options.resize_mode)


def download(options: DownloadOptions) -> dict:
    """Download the URL list into webdataset shards; returns the summary also written to
    `OUTPUT/summary.json`. Shards still incomplete after the retries are listed under
    `incomplete_shards` (the CLI then exits nonzero)."""
    started = time.perf_counter()
    options.validate()
    urls = inspect_url_list(options)
    expected = urls.shard_count(options.shard_size)
    before = read_shard_stats(options.output)
    prepare_output(options)
    retried: list[int] = []
    ray_timing = RayTiming()
    log_path = None
    try:
        if _missing(options.output, expected):
            if not options.verbose:
                handle, log_path = tempfile.mkstemp(prefix="mplug-download-", suffix=".log")
                os.close(handle)
                logger.info("img2dataset's output goes to %s", log_path)
            with ray_session(options.ray_address, options.processes) as ray_timing:
                progress = (Progress(options.output, expected, before) if options.progress
                            else contextlib.nullcontext())
                with progress:
                    _passes(options, urls, expected, retried, log_path)
        else:
            logger.info("all %d shards in %s are complete: nothing to download", expected, options.output)
    finally:
        _remove_leftover_tmp(options.output)
        stats = read_shard_stats(options.output)
        summary = build_summary(
            stats,
            expected_shards=expected,
            fetched=set(stats) - set(before),
            retried=retried,
            seconds=time.perf_counter() - started,
            ray_seconds=(ray_timing.start_seconds, ray_timing.stop_seconds),
            source=options.url_list,
            input_format=urls.input_format,
            shard_size=options.shard_size,
            image_size=options.image_size,
            resize_mode=options.resize_mode,
            log=log_path,
        )
        if log_path and not (retried or summary["incomplete_shards"]):
            os.remove(log_path)  # nothing went wrong: img2dataset's chatter is not worth keeping
            summary["log"] = None
        _write_results(options, summary, stats)
    if summary["incomplete_shards"]:
        logger.error(
            "shards %s are still incomplete after %d retries; their workers' errors are above%s. "
            "Run the same command again to retry only them.",
            shard_list(summary["incomplete_shards"]), options.retries,
            f" and in {log_path}" if log_path else "",
        )
    return summary


def _passes(options: DownloadOptions, urls: UrlList, expected: int, retried: list[int],
            log_path: str | None) -> None:
    """The first pass and up to `options.retries` more over the shards still without stats."""
    import ray

    for attempt in range(options.retries + 1):
        missing = _missing(options.output, expected)
        if not missing:
            return
        if attempt:
            logger.warning(
                "shards %s have no stats (a worker died or the shard raised): retry %d of %d",
                shard_list(missing), attempt, options.retries,
            )
            retried.extend(s for s in missing if s not in retried)
        try:
            run_img2dataset(options, urls.input_format, log_path)
        except ray.exceptions.RayError as error:
            logger.warning("a download task failed for good: %s", error)
