"""What a training run owes MLflow, kept under OUTPUT until MLflow has it, and the thread that sends it.

Every point the trainer logs is first appended to `OUTPUT/metrics.jsonl` (one line per step,
flushed per write), then handed to a sender thread that batches points into MLflow `log_batch`
calls with their explicit step and timestamp. The training loop therefore never waits on the
tracking server. When a call fails the sender warns once, keeps the points and tries again later;
`OUTPUT/metrics_sent.json` records how far into the journal everything has reached MLflow, so a
later process (a resumed run, or `replay_metrics`) sends exactly the rest. Re-sending a point is
harmless: MLflow stores one row per (key, step, timestamp, value). `OUTPUT/mlflow_run.json` names
the run and what else is still owed (its end status, a model package upload).

A journal line looks like

    {"run_id": "3f2a...", "step": 12, "timestamp": 1732000000123, "metrics": {"loss": 2.31},
     "tags": {}}
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

JOURNAL_NAME = "metrics.jsonl"
SENT_NAME = "metrics_sent.json"
RUN_RECORD_NAME = "mlflow_run.json"
MODEL_ARTIFACT = "model"
# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff 2 s,
# 120 s timeout); the sender retries on its own schedule, so each call gives up at once.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# A server that proxies artifacts answers an upload only once it has stored the whole file.
UPLOAD_TIMEOUT_S = "600"
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch call
MAX_TAGS_PER_CALL = 100  # MLflow's limit for params or tags in one log_batch call
# Errors after which sending the same batch again cannot succeed (the run is gone, a value is bad).
REJECTIONS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}
MAX_NAME_CHARS = 250  # MLflow's limit for a metric, param or tag name
NAME_PATTERN = re.compile(r"^[\w./\- ]+$")  # what MLflow accepts on every platform


class TrackingError(RuntimeError):
    """MLflow could not be reached or used where the run cannot go on without it."""


@dataclass
class RunRecord:
    """`OUTPUT/mlflow_run.json`: which run this output directory belongs to, and what is owed to it."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    status: str = "RUNNING"
    end_time: int | None = None
    status_sent: bool = True
    pending_model_package: str | None = None

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        path = folder / RUN_RECORD_NAME
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def write(self, folder: Path) -> None:
        partial = folder / (RUN_RECORD_NAME + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=2))
        os.replace(partial, folder / RUN_RECORD_NAME)


def bound_http_calls(tracking_uri: str) -> None:
    """Make MLflow's HTTP calls fail fast (unless the user set these variables themselves)."""
    if tracking_uri.startswith(("http://", "https://")):
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)


@contextlib.contextmanager
def patient_uploads():
    """Raise the HTTP timeout to UPLOAD_TIMEOUT_S for one upload, unless the user chose a timeout."""
    name = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    ours = os.environ.get(name) == HTTP_SETTINGS[name]
    if ours:
        os.environ[name] = UPLOAD_TIMEOUT_S
    try:
        yield
    finally:
        if ours:
            os.environ[name] = HTTP_SETTINGS[name]


@dataclass(frozen=True)
class JournalEntry:
    """One line of the journal: a step's metrics and/or tags for one run."""

    run_id: str
    step: int
    timestamp: int  # milliseconds since the epoch
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    end: int = 0  # byte offset just after this line in the journal

    def to_json(self) -> str:
        return json.dumps({"run_id": self.run_id, "step": self.step, "timestamp": self.timestamp,
                           "metrics": self.metrics, "tags": self.tags})


class MetricsJournal:
    """Append-only `metrics.jsonl` plus the `metrics_sent.json` mark of what MLflow already has."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / JOURNAL_NAME
        self.sent_path = Path(folder) / SENT_NAME
        self._handle = None

    def append(self, entry: JournalEntry) -> JournalEntry:
        """Write `entry` as one line, flush it, and return it with its end offset."""
        if self._handle is None:
            self._handle = open(self.path, "ab")  # kept open for the whole run
            if self._handle.tell() and not self._ends_with_newline():
                self._handle.write(b"\n")  # a previous process died mid-line
        self._handle.write(entry.to_json().encode() + b"\n")
        self._handle.flush()
        return JournalEntry(entry.run_id, entry.step, entry.timestamp, entry.metrics, entry.tags,
                            end=self._handle.tell())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def sent_offset(self) -> int:
        try:
            return int(json.loads(self.sent_path.read_text())["bytes"])
        except FileNotFoundError:
            return 0

    def mark_sent(self, offset: int) -> None:
        """Record that every line before byte `offset` has reached MLflow (atomic replace)."""
        partial = self.sent_path.with_suffix(".partial")
        partial.write_text(json.dumps({"bytes": offset}))
        os.replace(partial, self.sent_path)

    def unsent(self) -> list[JournalEntry]:
        """The entries after the sent mark, in order; unreadable lines are skipped with a warning."""
        if not self.path.exists():
            return []
        entries = []
        with open(self.path, "rb") as handle:
            handle.seek(self.sent_offset())
            for line in handle:
                end = handle.tell()
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    entries.append(JournalEntry(data["run_id"], int(data["step"]), int(data["timestamp"]),
                                                dict(data.get("metrics", {})), dict(data.get("tags", {})),
                                                end=end))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("skipping unreadable line ending at byte %d of %s (%s); "
                                "each line should be one JSON object with run_id, step, timestamp",
                                end, self.path, exc)
        return entries


def next_batch(entries: Iterable[JournalEntry]) -> list[JournalEntry]:
    """The longest prefix of `entries` for one run that fits one MLflow log_batch call."""
    batch: list[JournalEntry] = []
    metrics = tags = 0
    for entry in entries:
        if batch and (entry.run_id != batch[0].run_id
                      or metrics + len(entry.metrics) > MAX_METRICS_PER_CALL
                      or tags + len(entry.tags) > MAX_TAGS_PER_CALL):
            break
        batch.append(entry)
        metrics += len(entry.metrics)
        tags += len(entry.tags)
    return batch


def send_batch(client: MlflowClient, batch: list[JournalEntry]) -> None:
    """One synchronous log_batch call for `batch` (entries of one run); later tags win."""
    metrics = [Metric(key, value, e.timestamp, e.step) for e in batch for key, value in e.metrics.items()]
    tags: dict[str, str] = {}
    for entry in batch:
        tags.update(entry.tags)
    client.log_batch(batch[0].run_id, metrics=metrics,
                     tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)


def is_rejection(exc: Exception) -> bool:
    """Whether MLflow refused the data itself (so retrying is pointless), not merely failed to answer."""
    return isinstance(exc, MlflowException) and exc.error_code in REJECTIONS


def error_text(exc: Exception, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


class MetricsSender:
    """A daemon thread that sends journal entries to MLflow in order, never blocking the caller.

    `client_lock` serialises this thread's MLflow calls with the owner's own calls.
    `on_reconnect` runs (in this thread) after the first successful call that follows a failure.
    """

    def __init__(self, client: MlflowClient, journal: MetricsJournal, *, target: str,
                 client_lock: threading.Lock, flush_interval_s: float, retry_interval_s: float,
                 on_reconnect: Callable[[], None] | None = None):
        self._client = client
        self._journal = journal
        self._target = target
        self._client_lock = client_lock
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        self._on_reconnect = on_reconnect
        self._pending: deque[JournalEntry] = deque()
        self._cond = threading.Condition()
        self._online = True
        self._flush_wanted = 0
        self._flush_done = 0
        self._stopping = False
        self._final: Callable[[], None] | None = None
        self._final_done = False
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics-sender", daemon=True)

    def start(self, backlog: Iterable[JournalEntry] = ()) -> None:
        self._pending.extend(backlog)
        self._thread.start()

    @property
    def pending(self) -> int:
        """How many journal entries have not reached MLflow yet."""
        with self._cond:
            return len(self._pending)

    def submit(self, entry: JournalEntry) -> None:
        """Queue `entry` (already in the journal); returns at once."""
        with self._cond:
            self._pending.append(entry)

    def flush(self, timeout_s: float) -> bool:
        """Ask for an immediate send attempt and wait up to `timeout_s`; True when nothing is pending."""
        with self._cond:
            self._flush_wanted += 1
            wanted = self._flush_wanted
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._flush_done >= wanted, timeout=timeout_s)
            return not self._pending

    def close(self, timeout_s: float, final: Callable[[], None] | None = None) -> bool:
        """Send what is pending, then run `final` (e.g. ending the run), waiting at most `timeout_s`.

        True when everything was sent and `final` succeeded. The thread is a daemon: if MLflow
        hangs past the timeout it is simply abandoned and the journal keeps the rest.
        """
        with self._cond:
            self._stopping = True
            self._final = final
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            return not self._thread.is_alive() and not self._pending and self._final_done

    def _run(self) -> None:
        while True:
            with self._cond:
                wait_s = self._flush_interval_s if self._online else self._retry_interval_s
                self._cond.wait_for(lambda: self._stopping or self._flush_wanted > self._flush_done,
                                    timeout=wait_s)
                wanted, stopping = self._flush_wanted, self._stopping
            delivered = self._send_pending()
            if stopping:
                self._finish(delivered)
            with self._cond:
                self._flush_done = wanted
                self._cond.notify_all()
            if stopping:
                return

    def _finish(self, delivered: bool) -> None:
        if not delivered:
            return
        try:
            if self._final is not None:
                with self._client_lock:
                    self._final()
            self._final_done = True
        except Exception as exc:  # the run stays open; replay_metrics ends it later
            log.warning("could not end the MLflow run at %s (%s)", self._target, error_text(exc))

    def _send_pending(self) -> bool:
        """Send batches until none is pending (True) or a call fails for want of an answer (False)."""
        while True:
            with self._cond:
                batch = next_batch(self._pending)
            if not batch:
                return True
            try:
                with self._client_lock:
                    send_batch(self._client, batch)
            except Exception as exc:  # this thread must survive whatever the client raises
                if not is_rejection(exc):
                    self._went_offline(exc)
                    return False
                log.warning("MLflow at %s refused %d journal entries of run %s (steps %d-%d): %s; "
                            "they stay in %s but will not be sent again",
                            self._target, len(batch), batch[0].run_id, batch[0].step, batch[-1].step,
                            error_text(exc), self._journal.path)
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                backlog = len(self._pending)
            self._journal.mark_sent(batch[-1].end)
            if not self._online:
                self._online = True
                log.info("MLflow at %s answers again; sending the %d entries kept meanwhile",
                            self._target, backlog + len(batch))
                if self._on_reconnect is not None:
                    self._on_reconnect()

    def _went_offline(self, exc: Exception) -> None:
        if self._online:  # warn once per outage, not once per step
            log.warning("MLflow at %s did not take the metrics (%s); training goes on, the metrics "
                        "are kept in %s and sent when it answers again (retrying every %g s)",
                        self._target, error_text(exc), self._journal.path, self._retry_interval_s)
        self._online = False


def send_all(client: MlflowClient, journal: MetricsJournal, entries: list[JournalEntry]) -> int:
    """Send `entries` synchronously in batches, advancing the sent mark; returns how many were sent.

    Raises the client's error when MLflow does not answer; batches MLflow refuses are skipped
    with a warning.
    """
    sent = 0
    rest = entries
    while rest:
        batch = next_batch(rest)
        try:
            send_batch(client, batch)
            sent += len(batch)
        except MlflowException as exc:
            if not is_rejection(exc):
                raise
            log.warning("MLflow refused %d journal entries of run %s (steps %d-%d): %s",
                        len(batch), batch[0].run_id, batch[0].step, batch[-1].step, error_text(exc))
        journal.mark_sent(batch[-1].end)
        rest = rest[len(batch):]
    return sent


@functools.lru_cache(maxsize=4096)
def check_name(name: str, kind: str = "metric") -> str:
    """`name` if MLflow accepts it as a metric or tag name, else a ValueError that says why."""
    if (not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not NAME_PATTERN.match(name)
            or posixpath.normpath(name) != name or name.startswith(("/", ".."))):
        raise ValueError(f"{kind} name {name!r} is not accepted by MLflow: use at most "
                         f"{MAX_NAME_CHARS} letters, digits, '_', '-', '.', '/' or spaces, without a "
                         "leading '/', '..' or '//' (e.g. 'loss/itc')")
    return name


def metric_values(metrics: Mapping[str, object]) -> dict[str, float]:
    """`metrics` as floats (tensors and numpy scalars included); None values are left out."""
    values = {}
    for key, value in metrics.items():
        if value is None:
            continue
        check_name(key)
        try:
            values[key] = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} has value {value!r} of type {type(value).__name__}; "
                            "metrics must be numbers (or one-element tensors)") from None
    if len(values) > MAX_METRICS_PER_CALL:
        raise ValueError(f"{len(values)} metrics for one step; MLflow takes at most "
                         f"{MAX_METRICS_PER_CALL} in one call, so log fewer per step")
    return values


def replay_metrics(output_dir: str | Path, tracking_uri: str | None = None) -> int:
    """Send what a training run left unsent: journal entries, a model package, the run's end.

    Uses the tracking URI recorded in `OUTPUT/mlflow_run.json` unless `tracking_uri` is given.
    Returns the number of journal entries sent. Run it when no tracker is writing to OUTPUT.
    """
    output = Path(output_dir)
    record = RunRecord.read(output)
    if record is None:
        raise FileNotFoundError(f"{output / RUN_RECORD_NAME} does not exist; replay_metrics needs "
                                "the output directory of a tracked training run")
    uri = tracking_uri or record.tracking_uri
    bound_http_calls(uri)
    client = MlflowClient(tracking_uri=uri)
    journal = MetricsJournal(output)
    try:
        sent = send_all(client, journal, journal.unsent())
        if record.pending_model_package:
            with patient_uploads():
                client.log_artifacts(record.run_id, record.pending_model_package, MODEL_ARTIFACT)
            record.pending_model_package = None
            record.write(output)
        if record.status != "RUNNING" and not record.status_sent:
            client.set_terminated(record.run_id, record.status, record.end_time)
            record.status_sent = True
            record.write(output)
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {uri} did not take the replay ({error_text(exc)}); the unsent "
                            f"entries stay in {journal.path}; try again when it answers") from exc
    return sent
