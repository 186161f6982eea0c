"""MLflow tracking of a training run, against real MLflow stores: a local SQLite store under the
output directory and a real `mlflow server` on loopback that is stopped and started mid-run.

Every store starts as a copy of one empty, already migrated database (creating one costs seconds).
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from pretrain.tracking import (
    HTTP_SETTINGS,
    RUN_RECORD_NAME,
    NullTracker,
    Tracker,
    TrackingOptions,
    replay_metrics,
    source_commit,
)

CONFIG = {
    "name": "tiny",
    "model": {"vision": {"name": "vit_tiny", "layers": 2}, "fusion": {"layers": 2, "stride": 3}},
    "train": {"lr": 1e-4, "betas": [0.9, 0.98], "warmup": None, "bf16": True},
}
STEP_KEYS = ["loss/total", "loss/itc", "loss/itm", "lr", "grad_norm", "samples_per_s",
             "tokens_per_s", "mfu", "peak_memory_gb"]
FAST = TrackingOptions(system_metrics_interval_s=None, flush_interval_s=0.1, retry_interval_s=0.5)
SERVER_START_TIMEOUT_S = 60


def step_metrics(step: int) -> dict[str, float]:
    return {key: round(step + i / 10, 3) for i, key in enumerate(STEP_KEYS)}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


@pytest.fixture
def output(tmp_path, empty_store, monkeypatch) -> Path:
    """An output directory whose local store exists; the working directory is a separate folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(empty_store, out / "mlflow.db")
    return out


def start(out: Path, config=CONFIG, **kwargs) -> Tracker:
    kwargs = {"config_name": "tiny", "stage": "pretrain", "options": FAST, **kwargs}
    return Tracker.start(out, config, **kwargs)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_local_store_lives_under_the_output_directory(output):
    tracker = start(output)
    tracker.close()
    assert tracker.tracking_uri == f"sqlite:///{output.resolve()}/mlflow.db"
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert Path(run.info.artifact_uri).is_relative_to(output.resolve() / "mlruns")
    assert (output.resolve() / "mlruns").is_dir()
    assert list(Path.cwd().iterdir()) == []  # nothing written where the process happened to run


def test_config_is_logged_as_flattened_params_and_as_config_yaml(output, tmp_path):
    tracker = start(output)
    tracker.close()
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.params == {
        "name": "tiny", "model.vision.name": "vit_tiny", "model.vision.layers": "2",
        "model.fusion.layers": "2", "model.fusion.stride": "3", "train.lr": "0.0001",
        "train.betas": "[0.9, 0.98]", "train.warmup": "None", "train.bf16": "True",
    }
    path = mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="config.yaml",
                                               dst_path=str(tmp_path / "dl"),
                                               tracking_uri=tracker.tracking_uri)
    assert yaml.safe_load(Path(path).read_text()) == CONFIG


def test_hundreds_of_params_and_overlong_values_are_logged(output):
    config = {"layers": {f"l{i:03d}": i for i in range(250)}, "long": "x" * 7000}
    tracker = start(output, config)
    tracker.close()
    params = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.params
    assert len(params) == 251
    assert params["layers.l249"] == "249"
    assert params["long"] == "x" * 5997 + "..."


def test_every_step_is_one_point_per_metric_with_its_value(output):
    tracker = start(output)
    for step in range(5):
        tracker.log_metrics(step, {**step_metrics(step), "mfu_when_unknown": None})
    assert tracker.close() is True
    client = MlflowClient(tracker.tracking_uri)
    for key in STEP_KEYS:
        assert history(client, tracker.run_id, key) == [(s, step_metrics(s)[key]) for s in range(5)]
    assert "mfu_when_unknown" not in client.get_run(tracker.run_id).data.metrics


def test_every_point_is_first_written_to_the_local_journal(output):
    tracker = start(output, options=TrackingOptions(system_metrics_interval_s=None,
                                                    flush_interval_s=3600))
    for step in range(3):
        tracker.log_metrics(step, {"loss": step / 2})
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["metrics"]) for line in lines] == [
        (0, {"loss": 0.0}), (1, {"loss": 0.5}), (2, {"loss": 1.0})]
    assert tracker.close() is True


def test_tags_carry_stage_config_commit_output_checkpoint_and_extra_tags(output):
    tracker = start(output, stage="finetune", config_name="base", tags={"mplug.parent_run": "abc123"})
    tracker.set_checkpoint_location(output / "checkpoints")
    tracker.set_tags({"note": 7})
    tracker.close()
    tags = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.tags
    assert tags["mplug.stage"] == "finetune"
    assert tags["mplug.config"] == "base"
    assert tags["mplug.parent_run"] == "abc123"
    assert tags["mplug.output_dir"] == str(output.resolve())
    assert tags["mplug.checkpoint"] == str(output / "checkpoints")
    assert tags["note"] == "7"
    commit = source_commit()
    if commit is None:
        assert "mlflow.source.git.commit" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == commit[0]
        assert tags["mplug.git_dirty"] == str(commit[1]).lower()


def test_source_commit_is_none_outside_a_git_work_tree(tmp_path):
    assert source_commit(tmp_path) is None


def test_model_package_becomes_the_model_artifact_and_a_registered_version(output, tmp_path,
                                                                           monkeypatch):
    package = tmp_path / "package"
    (package / "tokenizer").mkdir(parents=True)
    (package / "model.safetensors").write_bytes(os.urandom(4096))
    (package / "config.json").write_text('{"hidden": 64}')
    (package / "tokenizer" / "vocab.txt").write_text("[PAD]\n[CLS]\n")
    tracker = start(output)
    assert tracker.log_model_package(package) == f"runs:/{tracker.run_id}/model"
    version = tracker.register_model("mplug-vqa")
    tracker.close()
    assert (version.name, version.version, version.run_id) == ("mplug-vqa", 1, tracker.run_id)
    assert version.source == f"runs:/{tracker.run_id}/model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracker.tracking_uri)
    for uri, dst in [(f"runs:/{tracker.run_id}/model", "run"), ("models:/mplug-vqa/1", "registry")]:
        copy = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / dst)))
        comparison = filecmp.dircmp(package, copy)
        assert comparison.left_only == comparison.right_only == comparison.diff_files == []
        assert filecmp.cmp(package / "tokenizer" / "vocab.txt", copy / "tokenizer" / "vocab.txt",
                           shallow=False)
        assert (copy / "model.safetensors").read_bytes() == (package / "model.safetensors").read_bytes()


def test_system_metrics_are_logged_while_the_run_is_open(output):
    tracker = start(output, options=TrackingOptions(system_metrics_interval_s=0.1))
    time.sleep(0.5)
    tracker.close()
    metrics = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_without_psutil_the_run_goes_on_without_system_metrics_after_one_warning(output, caplog,
                                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # what an environment without psutil shows
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        tracker = start(output, options=TrackingOptions(system_metrics_interval_s=0.1))
        tracker.log_metrics(0, {"loss": 1.0})
        assert tracker.close() is True
    assert [r.getMessage() for r in caplog.records if "psutil" in r.getMessage()] == [
        "psutil is not installed, so MLflow system metrics (CPU, memory, disk, network) are not "
        "logged; `pip install psutil` adds them"]
    metrics = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert list(metrics) == ["loss"]


def test_resumed_training_continues_the_same_run_and_appends_steps(output):
    first = start(output)
    for step in range(3):
        first.log_metrics(step, {"loss": float(step)})
    first.close()
    second = start(output)
    assert second.run_id == first.run_id
    for step in range(3, 5):
        second.log_metrics(step, {"loss": float(step)})
    second.close()
    client = MlflowClient(second.tracking_uri)
    assert history(client, second.run_id, "loss") == [(s, float(s)) for s in range(5)]
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(second.run_id).info.experiment_id])) == 1


def test_resume_with_a_changed_config_keeps_the_first_params_and_logs_the_new_config(output, caplog):
    start(output).close()
    changed = {**CONFIG, "train": {**CONFIG["train"], "lr": 3e-4, "max_steps": 10}}
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        tracker = start(output, changed)
    tracker.close()
    assert "train.lr" in caplog.text
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.params["train.max_steps"] == "10"
    artifacts = [a.path for a in MlflowClient(tracker.tracking_uri).list_artifacts(tracker.run_id)]
    assert sorted(artifacts) == ["config.resumed.yaml", "config.yaml"]


def test_a_recorded_run_the_store_does_not_have_is_replaced_by_a_new_run(output, caplog):
    (output / RUN_RECORD_NAME).write_text(
        '{"run_id": "0123456789abcdef0123456789abcdef", "tracking_uri": "http://elsewhere:5000", '
        '"experiment_id": "7"}')
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        tracker = start(output)
    tracker.close()
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert "0123456789abcdef0123456789abcdef" in caplog.text
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("status", "raised"), [("FAILED", RuntimeError), ("KILLED", KeyboardInterrupt)])
def test_a_run_left_by_an_exception_ends_with_its_status(output, status, raised):
    with pytest.raises(raised), start(output) as tracker:
        raise raised("stop")
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == status


def test_replay_sends_what_a_crashed_trainer_left_unsent(output):
    crash = textwrap.dedent(f"""
        import os
        from pretrain.tracking import Tracker, TrackingOptions
        options = TrackingOptions(system_metrics_interval_s=None, flush_interval_s=3600)
        tracker = Tracker.start({str(output)!r}, {{"a": 1}}, config_name="tiny", stage="pretrain",
                                options=options)
        for step in range(4):
            tracker.log_metrics(step, {{"loss": step * 1.5}})
        os._exit(1)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", crash], env=env, timeout=120)
    run_id = json.loads((output / RUN_RECORD_NAME).read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{output.resolve()}/mlflow.db")
    assert history(client, run_id, "loss") == []
    assert replay_metrics(output) == 4
    assert history(client, run_id, "loss") == [(s, s * 1.5) for s in range(4)]
    assert replay_metrics(output) == 0


def test_other_ranks_get_a_tracker_that_does_nothing_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    out = tmp_path / "out"
    for tracker in [Tracker.start(out, CONFIG, config_name="tiny", stage="pretrain"),
                    Tracker.start(out, CONFIG, config_name="tiny", stage="pretrain", rank=1)]:
        assert isinstance(tracker, NullTracker)
        with tracker:
            tracker.log_metrics(0, {"loss": 1.0})
            tracker.set_tags({"a": "b"})
            tracker.set_checkpoint_location(out / "ckpt")
            assert tracker.log_model_package(tmp_path) is None
            assert tracker.flush() is True
        assert tracker.run_id is None
    assert not out.exists()


@pytest.mark.parametrize(("metrics", "message"), [
    ({"loss//itc": 1.0}, "'loss//itc' is not accepted"),
    ({"loss?": 1.0}, "'loss?' is not accepted"),
    ({"loss": "high"}, "metric 'loss' has value 'high' of type str"),
])
def test_metrics_mlflow_would_refuse_are_refused_at_once_with_the_reason(output, metrics, message):
    tracker = start(output)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        tracker.log_metrics(0, metrics)
    tracker.close()


def test_unknown_stage_and_end_status_are_refused(output):
    with pytest.raises(ValueError, match="stage 'train' is not one of pretrain, finetune"):
        start(output, stage="train")
    tracker = start(output)
    with pytest.raises(ValueError, match="'DONE' is not one of FINISHED, FAILED, KILLED"):
        tracker.close("DONE")
    tracker.close()


# --- a real tracking server that goes away and comes back ------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, store: Path, artifacts: Path) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.exists():
        pytest.skip(f"the mlflow command is not installed beside {sys.executable}")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"mlflow server on port {port} did not answer within {SERVER_START_TIMEOUT_S} s")


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server and the worker process it spawned (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@dataclass
class Outage:
    """What two trackers saw while their tracking server went away and came back."""

    uri: str
    live: Tracker  # kept open through the outage
    closed: Tracker  # closed while the server was away
    closed_output: Path
    http_settings: dict[str, str | None] = field(default_factory=dict)
    log_seconds: list[float] = field(default_factory=list)
    flushed_before: bool = False
    flushed_during: bool = True
    flushed_after: bool = False
    closed_during: bool = True
    close_seconds: float = 0.0
    live_closed: bool = False
    replayed: int = 0
    records: list[logging.LogRecord] = field(default_factory=list)


class Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def outage(tmp_path_factory, empty_store):
    """Steps 0-4 logged with the server up, 5-9 with it stopped, then the server restarted."""
    tmp = tmp_path_factory.mktemp("outage")
    port = free_port()
    store, artifacts = tmp / "server.db", tmp / "artifacts"
    shutil.copy(empty_store, store)
    uri = f"http://127.0.0.1:{port}"
    sender_log = logging.getLogger("pretrain.metrics_buffer")
    records: list[logging.LogRecord] = []
    handler = Collect(records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("RANK", raising=False)
        for name in HTTP_SETTINGS:  # unset now, and unset again afterwards
            patch.setenv(name, "")
            patch.delenv(name)
        server = start_server(port, store, artifacts)
        sender_log.addHandler(handler)
        sender_log.setLevel(logging.INFO)
        try:
            live = start(tmp / "live", options=TrackingOptions(
                system_metrics_interval_s=0.5, flush_interval_s=0.1, retry_interval_s=0.5))
            closed = start(tmp / "closed")
            seen = Outage(uri, live, closed, tmp / "closed", records=records,
                          http_settings={name: os.environ.get(name) for name in HTTP_SETTINGS})
            for step in range(5):
                live.log_metrics(step, step_metrics(step))
                closed.log_metrics(step, step_metrics(step))
            seen.flushed_before = live.flush(timeout_s=10) and closed.flush(timeout_s=10)

            stop_server(server)
            for step in range(5, 10):
                for tracker in (live, closed):
                    began = time.monotonic()
                    tracker.log_metrics(step, step_metrics(step))
                    seen.log_seconds.append(time.monotonic() - began)
                time.sleep(0.2)
            seen.flushed_during = live.flush(timeout_s=5)
            began = time.monotonic()
            seen.closed_during = closed.close()
            seen.close_seconds = time.monotonic() - began

            server = start_server(port, store, artifacts)
            seen.flushed_after = live.flush(timeout_s=10)
            time.sleep(1.5)  # the system metrics monitor, restarted on reconnection, samples again
            seen.live_closed = live.close()
            seen.replayed = replay_metrics(seen.closed_output)
            yield seen
        finally:
            sender_log.removeHandler(handler)
            sender_log.setLevel(logging.NOTSET)
            stop_server(server)


@pytest.mark.slow
def test_tracker_http_calls_give_up_at_once_instead_of_retrying_for_minutes(outage):
    assert outage.http_settings == HTTP_SETTINGS
    assert outage.flushed_before is True
    assert outage.flushed_during is False  # the send attempt failed within the 5 s flush wait


@pytest.mark.slow
def test_logging_returns_at_once_while_the_server_is_away(outage):
    assert len(outage.log_seconds) == 10
    assert max(outage.log_seconds) < 1.0


@pytest.mark.slow
def test_an_outage_is_warned_about_once_per_tracker_and_its_end_announced(outage):
    messages = [r.getMessage() for r in outage.records]
    assert sum("did not take the metrics" in m for m in messages) == 2  # live and closed
    assert any("answers again" in m for m in messages)


@pytest.mark.slow
def test_points_logged_while_the_server_was_away_reach_it_once_it_returns(outage):
    assert outage.flushed_after is True
    assert outage.live_closed is True
    client = MlflowClient(outage.uri)
    for key in STEP_KEYS:
        assert history(client, outage.live.run_id, key) == [(s, step_metrics(s)[key]) for s in range(10)]
    run = client.get_run(outage.live.run_id)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics


@pytest.mark.slow
def test_a_run_closed_while_the_server_was_away_is_completed_by_replay(outage):
    assert outage.closed_during is False
    assert outage.close_seconds < TrackingOptions().close_timeout_s
    assert outage.replayed == 5
    client = MlflowClient(outage.uri)
    for key in STEP_KEYS:
        assert history(client, outage.closed.run_id, key) == [(s, step_metrics(s)[key]) for s in range(10)]
    assert client.get_run(outage.closed.run_id).info.status == "FINISHED"
