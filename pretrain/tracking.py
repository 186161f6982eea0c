"""MLflow tracking of a training run: config, per-step metrics, system metrics, tags, model package.

`Tracker.start(OUTPUT, config, config_name=..., stage=...)` opens the run on rank 0 (other ranks
get a `NullTracker` with the same methods that does nothing). The tracking URI comes from
`MLFLOW_TRACKING_URI`, else a local store under the output directory: `OUTPUT/mlflow.db` with
artifacts under `OUTPUT/mlruns`. The run id is kept in `OUTPUT/mlflow_run.json`, so a resumed
training run continues the same MLflow run.

Metrics never wait on the server: they go to `OUTPUT/metrics.jsonl` first and are sent by a
background thread (see `metrics_buffer`). If the server goes away, training goes on with one
warning; the points are sent when it returns, at `close()`, or later by `replay_metrics(OUTPUT)`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import operator
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pretrain.metrics_buffer import (
    HTTP_SETTINGS,
    MAX_TAGS_PER_CALL,
    MODEL_ARTIFACT,
    RUN_RECORD_NAME,
    JournalEntry,
    MetricsJournal,
    MetricsSender,
    RunRecord,
    TrackingError,
    bound_http_calls,
    check_name,
    error_text,
    is_rejection,
    metric_values,
    patient_uploads,
    replay_metrics,
)

__all__ = ["HTTP_SETTINGS", "RUN_RECORD_NAME", "NullTracker", "Tracker", "TrackingError",
           "TrackingOptions", "register_model_package", "replay_metrics", "source_commit"]

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value (very old servers: 500)
MAX_TAG_CHARS = 8000  # MLflow's limit for a tag value
SQLITE_PREFIX = "sqlite:///"  # a SQLite store: the path follows (a fourth slash starts an absolute one)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

TAG_STAGE = "mplug.stage"
TAG_CONFIG = "mplug.config"
TAG_OUTPUT = "mplug.output_dir"
TAG_CHECKPOINT = "mplug.checkpoint"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "mplug.git_dirty"


@dataclasses.dataclass(frozen=True)
class TrackingOptions:
    """Timings of the tracker; the defaults suit training, tests shorten them."""

    system_metrics_interval_s: float | None = 10.0  # None: no MLflow system metrics
    flush_interval_s: float = 2.0  # how often queued points are sent
    retry_interval_s: float = 15.0  # how often a silent server is tried again
    close_timeout_s: float = 10.0  # the longest close() waits for MLflow


def local_tracking_uri(output: Path) -> str:
    return f"{SQLITE_PREFIX}{output.resolve() / 'mlflow.db'}"


def default_tracking_uri(output: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(output)


def sqlite_artifact_location(uri: str) -> str | None:
    """`mlruns/` beside a SQLite store's file, where a new experiment keeps its artifacts.

    MLflow would put them under ./mlruns of whichever working directory created the experiment;
    a server or any other store decides for itself (None).
    """
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return str(Path(uri[len(SQLITE_PREFIX):]).resolve().parent / "mlruns")


def plain(value: Any) -> Any:
    """`value` as YAML/JSON-friendly data: dataclasses and tuples become dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.fusion.stride": "3", ...}; lists as JSON; long values cut."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flatten_params(value, name + "."))
            continue
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        params[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return params


def source_commit(folder: Path = PACKAGE_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the git work tree the packages were imported from; None without one."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != folder.resolve():
            return None  # installed into site-packages of some other repository
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def tag_text(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow takes them: checked names, string values cut to MLflow's limit."""
    if len(tags) > MAX_TAGS_PER_CALL:
        raise ValueError(f"{len(tags)} tags at once; MLflow takes at most {MAX_TAGS_PER_CALL} per call")
    texts = {}
    for key, value in tags.items():
        check_name(key, "tag")
        texts[key] = str(value)[:MAX_TAG_CHARS]
    return texts


class NullTracker:
    """The tracker of ranks other than 0: the same methods, doing nothing and writing nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def set_checkpoint_location(self, location: str | Path) -> None:
        pass

    def log_model_package(self, folder: str | Path) -> str | None:
        return None

    def register_model(self, name: str) -> ModelVersion | None:
        return None

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> bool:
        return True

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


class Tracker:
    """One MLflow run of one training run (rank 0). Create it with `Tracker.start`."""

    def __init__(self, output: Path, client: MlflowClient, record: RunRecord, options: TrackingOptions):
        self.output = output
        self.run_id = record.run_id
        self.tracking_uri = record.tracking_uri
        self._client = client
        self._record = record
        self._options = options
        self._client_lock = threading.Lock()
        self._monitor_lock = threading.Lock()
        self._monitor = None
        self._closed = False
        self._close_result = False
        self._last_step = 0
        self._journal = MetricsJournal(output)
        self._sender = MetricsSender(
            client, self._journal, target=record.tracking_uri, client_lock=self._client_lock,
            flush_interval_s=options.flush_interval_s, retry_interval_s=options.retry_interval_s,
            on_reconnect=self._restart_system_metrics)

    @classmethod
    def start(cls, output_dir: str | Path, config: Mapping[str, Any] | Any, *, config_name: str,
              stage: str, tags: Mapping[str, Any] | None = None, experiment: str = "mplug",
              rank: int | None = None, run_name: str | None = None,
              options: TrackingOptions = TrackingOptions()) -> Tracker | NullTracker:
        """Open (or, when `OUTPUT/mlflow_run.json` names one the store has, resume) the run.

        `config` is the resolved config (a dict or a config dataclass); it is logged as
        flattened params and as `config.yaml`. `rank` defaults to the RANK environment variable.
        Raises TrackingError when MLflow cannot be reached at start.
        """
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        if rank != 0:
            return NullTracker()
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(output)
        bound_http_calls(uri)
        config_dict = plain(config)
        all_tags = {TAG_STAGE: stage, TAG_CONFIG: config_name, TAG_OUTPUT: str(output.resolve())}
        if commit := source_commit():
            all_tags[TAG_GIT_COMMIT], all_tags[TAG_GIT_DIRTY] = commit[0], str(commit[1]).lower()
        all_tags.update(tags or {})
        client = MlflowClient(tracking_uri=uri)
        try:
            record, resumed = _open_run(client, output, uri, experiment,
                                        run_name or f"{stage}-{config_name}")
            tracker = cls(output, client, record, options)
            tracker._log_config(config_dict, resumed)
            client.log_batch(record.run_id, tags=[RunTag(k, v) for k, v in tag_text(all_tags).items()],
                             synchronous=True)
        except MlflowException as exc:
            if is_rejection(exc):
                raise
            raise TrackingError(
                f"could not start MLflow tracking at {uri} ({error_text(exc)}); start the tracking "
                f"server, or unset MLFLOW_TRACKING_URI to track into {local_tracking_uri(output)}"
            ) from exc
        tracker._start_system_metrics(resume=resumed)
        tracker._sender.start(backlog=tracker._journal.unsent())
        log.info("MLflow run %s (%s) at %s", record.run_id, "resumed" if resumed else "new", uri)
        return tracker

    def _log_config(self, config: dict[str, Any], resumed: bool) -> None:
        params = flatten_params(config)
        text = yaml.safe_dump(config, sort_keys=False)
        if resumed:  # MLflow params cannot change: log only new keys, name the changed ones
            existing = self._client.get_run(self.run_id).data.params
            changed = sorted(k for k in params if k in existing and existing[k] != params[k])
            if changed:
                log.warning("the resumed run's config differs from run %s in %s; MLflow keeps the "
                            "first values, the new config is logged as config.resumed.yaml",
                            self.run_id, ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))
                self._client.log_text(self.run_id, text, "config.resumed.yaml")
            params = {k: v for k, v in params.items() if k not in existing}
        else:
            self._client.log_text(self.run_id, text, "config.yaml")
        items = [Param(k, v) for k, v in params.items()]
        for first in range(0, len(items), MAX_TAGS_PER_CALL):
            self._client.log_batch(self.run_id, params=items[first:first + MAX_TAGS_PER_CALL],
                                   synchronous=True)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (name -> number; None values skipped) at `step`; returns at once."""
        self._check_open("log_metrics")
        step = operator.index(step)
        values = metric_values(metrics)
        if values:
            self._last_step = step
            self._submit(JournalEntry(self.run_id, step, int(time.time() * 1000), metrics=values))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified); queued like metrics, so it never blocks."""
        self._check_open("set_tags")
        if tags:
            self._submit(JournalEntry(self.run_id, self._last_step, int(time.time() * 1000),
                                      tags=tag_text(tags)))

    def set_checkpoint_location(self, location: str | Path) -> None:
        """Record where this run's (DeepSpeed) checkpoints are, as the `mplug.checkpoint` tag."""
        self.set_tags({TAG_CHECKPOINT: str(location)})

    def _submit(self, entry: JournalEntry) -> None:
        self._sender.submit(self._journal.append(entry))

    def log_model_package(self, folder: str | Path) -> str | None:
        """Upload `folder` as the run's `model/` artifact; returns `runs:/<run_id>/model`.

        Waits for the upload. If MLflow does not take it, warns and returns None; the folder is
        remembered in `mlflow_run.json` and `replay_metrics` uploads it later.
        """
        self._check_open("log_model_package")
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model package folder {folder} does not exist; pass the folder "
                                    "holding the weights, model config and tokenizer")
        try:
            with self._client_lock, patient_uploads():
                self._client.log_artifacts(self.run_id, str(folder), MODEL_ARTIFACT)
            pending = None
        except Exception as exc:
            pending = str(folder.resolve())
            log.warning("could not upload the model package %s to MLflow at %s (%s); run "
                        "replay_metrics(%r) to upload it later", folder, self.tracking_uri,
                        error_text(exc), str(self.output))
        if pending != self._record.pending_model_package:
            self._record.pending_model_package = pending
            self._record.write(self.output)
        return None if pending else f"runs:/{self.run_id}/{MODEL_ARTIFACT}"

    def register_model(self, name: str) -> ModelVersion:
        """Register this run's `model/` artifact as a new version of model `name`."""
        return register_model_package(self.run_id, name, self.tracking_uri)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Try to send everything queued now, waiting at most `timeout_s`; True when all was sent."""
        self._check_open("flush")
        return self._sender.flush(timeout_s)

    def close(self, status: str = "FINISHED") -> bool:
        """End the run with `status` after a bounded flush; True when MLflow got everything.

        What MLflow did not get stays in the journal; `replay_metrics(OUTPUT)` sends it and ends
        the run later. Closing twice returns the first result.
        """
        if self._closed:
            return self._close_result
        if status not in END_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(END_STATUSES)}")
        self._closed = True
        timeout_s = self._options.close_timeout_s
        self._stop_system_metrics(timeout_s)
        end_time = int(time.time() * 1000)
        self._record.status, self._record.end_time, self._record.status_sent = status, end_time, False
        self._record.write(self.output)
        done = self._sender.close(
            timeout_s, final=lambda: self._client.set_terminated(self.run_id, status, end_time))
        self._journal.close()
        if done:
            self._record.status_sent = True
            self._record.write(self.output)
        else:
            log.warning("%d journal entries and the end (%s) of run %s did not reach MLflow at %s "
                        "within %.0f s; they are kept in %s; send them later with "
                        "pretrain.tracking.replay_metrics(%r)", self._sender.pending, status,
                        self.run_id, self.tracking_uri, timeout_s, self._journal.path, str(self.output))
        self._close_result = done
        return done

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what} was called after close() of MLflow run {self.run_id}; "
                               "start a new Tracker to log more")

    def _start_system_metrics(self, resume: bool) -> None:
        interval = self._options.system_metrics_interval_s
        if interval is None:
            return
        if importlib.util.find_spec("psutil") is None:
            log.warning("psutil is not installed, so MLflow system metrics (CPU, memory, disk, "
                        "network) are not logged; `pip install psutil` adds them")
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with self._monitor_lock:
            if self._closed:
                return
            try:
                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                     resume_logging=resume,
                                                     tracking_uri=self.tracking_uri)
                self._monitor.start()
            except Exception as exc:
                log.warning("MLflow system metrics did not start (%s); the run goes on without them",
                            error_text(exc))

    def _restart_system_metrics(self) -> None:
        """MLflow's monitor stops for good when the server is away; start a fresh one after."""
        self._stop_system_metrics(self._options.close_timeout_s)
        self._start_system_metrics(resume=True)

    def _stop_system_metrics(self, timeout_s: float) -> None:
        with self._monitor_lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:  # finish() flushes over HTTP: bound it
            stopper = threading.Thread(target=monitor.finish, daemon=True)
            stopper.start()
            stopper.join(timeout_s)


def _open_run(client: MlflowClient, output: Path, uri: str, experiment: str,
              run_name: str) -> tuple[RunRecord, bool]:
    """The run recorded in `output` if the store has it (set RUNNING again), else a new one."""
    previous = RunRecord.read(output)
    if previous is not None:
        try:
            run = client.get_run(previous.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(run.info.run_id, status="RUNNING")
            record = RunRecord(run.info.run_id, uri, run.info.experiment_id,
                               pending_model_package=previous.pending_model_package)
            record.write(output)
            return record, True
        log.warning("run %s named in %s is not in the MLflow store at %s (it was recorded for %s); "
                    "starting a new run", previous.run_id, output / RUN_RECORD_NAME, uri,
                    previous.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(experiment, artifact_location=sqlite_artifact_location(uri))
    elif found.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {experiment!r} at {uri} is deleted; restore it "
                            f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) "
                            "or pass another experiment name")
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name)
    record = RunRecord(run.info.run_id, uri, experiment_id)
    record.write(output)
    return record, False


def register_model_package(run_id: str, name: str, tracking_uri: str) -> ModelVersion:
    """Register `runs:/<run_id>/model` as a new version of registered model `name` (created if new)."""
    client = MlflowClient(tracking_uri=tracking_uri)  # registry: MLFLOW_REGISTRY_URI or the same
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}",
                                       run_id=run_id)
