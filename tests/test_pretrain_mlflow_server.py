"""`mplug pretrain` on 2 CPU ranks tracked by a real `mlflow server` on loopback.

One server (SQLite backend store, artifacts proxied through the server) serves the module. The
first run trains with the server up: params, tags, the losses of every step and the `model/`
artifact must all be on the server. The second run loses its server mid-run (the server is
killed): training must still finish, and once a server is back on the same store `replay_metrics`
must bring the run's history to what the trainer's journal holds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from test_pretrain import pretrain_command, pretraining_data  # noqa: F401 (a fixture)

from data_prep.batch import tokenize
from pretrain.config import load_config, to_dict
from pretrain.metrics_buffer import HTTP_SETTINGS, RunRecord
from pretrain.models.mplug import image_feature, text_feature
from pretrain.package import load_package
from pretrain.tracking import flatten_params, plain, replay_metrics

TRAIN_TIMEOUT_S = 400
LOSSES = ("loss", "itc", "itm", "mlm", "prefix_lm")
TRACKED_STEPS = 6
OUTAGE_STEPS = 30
KILL_AFTER_STEP = 5  # the server is killed once this step is printed, with 25 steps to go
PROGRESS = re.compile(r"^step (\d+)/\d+  (.*?)  [\d.]+ samples/s")

pytestmark = pytest.mark.slow


def trainer_env(uri: str) -> dict[str, str]:
    """The test's environment pointed at `uri`, without the HTTP bounds the tracker must set itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    for name in ("RANK", *HTTP_SETTINGS):
        env.pop(name, None)
    return env


def printed_losses(output: str) -> dict[int, dict[str, float]]:
    """step -> {loss name: value} from the progress lines `step 3/6  loss 13.030  itc 2.080 ...`."""
    losses = {}
    for line in output.splitlines():
        if match := PROGRESS.match(line):
            pairs = match.group(2).split()
            losses[int(match.group(1))] = {k: float(v) for k, v in zip(pairs[::2], pairs[1::2], strict=True)}
    return losses


def journal_losses(output: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step in the trainer's metrics journal, in order."""
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["metrics"]["loss"]) for line in lines if "loss" in line["metrics"]]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


# --- training with the server up -------------------------------------------------------------


@dataclass
class TrackedRun:
    output: Path
    run_id: str
    client: MlflowClient
    printed: str


@pytest.fixture(scope="module")
def tracked(server, pretraining_data, tmp_path_factory) -> TrackedRun:  # noqa: F811
    output = tmp_path_factory.mktemp("tracked") / "run"
    command = pretrain_command(pretraining_data, output, TRACKED_STEPS, "--set", "train.log_every=1",
                               "--set", "train.zero_stage=2")
    result = subprocess.run(command, env=trainer_env(server.uri), capture_output=True, text=True,
                            timeout=TRAIN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return TrackedRun(output, RunRecord.read(output).run_id, MlflowClient(server.uri), result.stderr)


def test_the_run_has_the_resolved_config_as_flattened_params(tracked):
    params = tracked.client.get_run(tracked.run_id).data.params
    resolved = load_config(str(tracked.output / "package" / "config.yaml"))
    assert params == flatten_params(plain(to_dict(resolved)))
    assert params["train.zero_stage"] == "2"  # the --set overrides, not the preset's values
    assert params["model.queue_size"] == "32"
    assert params["model.text.width"] == "64"
    assert params["name"] == "tiny"


def test_the_run_is_tagged_with_its_stage_and_config_name(tracked):
    tags = tracked.client.get_run(tracked.run_id).data.tags
    assert tags["mplug.stage"] == "pretrain"
    assert tags["mplug.config"] == "tiny"


def test_the_run_ends_finished(tracked):
    assert tracked.client.get_run(tracked.run_id).info.status == "FINISHED"


def test_every_loss_has_one_point_per_step_with_the_printed_value(tracked):
    printed = printed_losses(tracked.printed)
    assert sorted(printed) == list(range(1, TRACKED_STEPS + 1))
    for key in LOSSES:
        points = history(tracked.client, tracked.run_id, key)
        assert [step for step, _ in points] == list(range(1, TRACKED_STEPS + 1)), key
        assert [round(value, 3) for _, value in points] == [printed[step][key] for step, _ in points], key


def test_the_model_artifact_served_by_the_server_loads_into_the_local_packages_model(tracked, server,
                                                                                     tmp_path):
    assert tracked.client.get_run(tracked.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    folder = mlflow.artifacts.download_artifacts(f"runs:/{tracked.run_id}/model", dst_path=str(tmp_path),
                                                 tracking_uri=server.uri)
    logged, local = load_package(folder), load_package(tracked.output / "package")
    assert not logged.model.training
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    text = tokenize(local.tokenizer, ["a red circle left of a blue square", "a green triangle"], 24)
    with torch.no_grad():
        outputs = []
        for model in (logged.model, local.model):
            vision = model.encode_image(images)  # (B, Lv, D)
            words = model.encode_text(text["input_ids"], text["attention_mask"])  # (B, Lt, D)
            outputs.append((vision, image_feature(model, vision), text_feature(model, words)))
    for from_server, from_disk in zip(*outputs, strict=True):
        assert torch.equal(from_server, from_disk)


# --- the server killed while training runs ----------------------------------------------------


@dataclass
class Outage(TrackedRun):
    returncode: int
    trainer_alive_at_kill: bool
    losses_before_replay: list[tuple[int, float]]
    replayed: int


@pytest.fixture(scope="module")
def outage(server, pretraining_data, tmp_path_factory) -> Outage:  # noqa: F811
    """Kill the server after step 5 of 30, let training finish, restart the server, replay."""
    output = tmp_path_factory.mktemp("outage") / "run"
    command = pretrain_command(pretraining_data, output, OUTAGE_STEPS, "--set", "train.log_every=1",
                               "--set", "train.checkpoint_every=10")
    trainer = subprocess.Popen(command, env=trainer_env(server.uri), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    alive_at_kill = None
    try:
        printed = []
        for line in trainer.stdout:
            printed.append(line)
            if line.startswith(f"step {KILL_AFTER_STEP}/{OUTAGE_STEPS} "):
                alive_at_kill = trainer.poll() is None
                server.kill()
                break
        printed.append(trainer.communicate(timeout=TRAIN_TIMEOUT_S)[0])
    finally:
        if trainer.poll() is None:  # a failed assertion or a timeout: end the ranks this test started
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
        if server.process.poll() is not None:
            server.start()  # on the same store and port
    printed_text = "".join(printed)
    assert alive_at_kill is not None, (
        f"training never printed step {KILL_AFTER_STEP}:\n{printed_text[-5000:]}")
    run_id = RunRecord.read(output).run_id
    client = MlflowClient(server.uri)
    before = history(client, run_id, "loss")
    with pytest.MonkeyPatch.context() as patch:  # replay bounds MLflow's HTTP calls through os.environ
        for name in HTTP_SETTINGS:
            patch.setenv(name, "")  # so that leaving the context restores the variable's absence
            patch.delenv(name)
        replayed = replay_metrics(output)
    return Outage(output, run_id, client, printed_text, returncode=trainer.returncode,
                  trainer_alive_at_kill=alive_at_kill, losses_before_replay=before, replayed=replayed)


def test_training_finishes_with_exit_code_0_when_the_server_is_killed_mid_run(outage):
    assert outage.trainer_alive_at_kill
    assert outage.returncode == 0, outage.printed[-5000:]
    assert f"step {OUTAGE_STEPS}/{OUTAGE_STEPS} " in outage.printed


def test_the_trainer_warns_once_that_the_metrics_are_kept_for_later(outage):
    assert outage.printed.count("did not take the metrics") == 1, outage.printed[-5000:]
    assert "training goes on, the metrics are kept in" in outage.printed
    assert "could not upload the model package" in outage.printed


def test_the_server_lacks_the_steps_logged_while_it_was_down_until_replay(outage):
    steps = [step for step, _ in outage.losses_before_replay]
    assert steps == list(range(1, len(steps) + 1))
    assert len(steps) < OUTAGE_STEPS
    assert outage.replayed > 0


def test_replay_brings_the_loss_history_to_the_journal_values_one_point_per_step(outage):
    journal = journal_losses(outage.output)
    assert [step for step, _ in journal] == list(range(1, OUTAGE_STEPS + 1))
    assert history(outage.client, outage.run_id, "loss") == journal
    printed = printed_losses(outage.printed)
    assert [round(value, 3) for _, value in journal] == [printed[step]["loss"] for step, _ in journal]


def test_replay_uploads_the_model_package_and_ends_the_run(outage):
    run = outage.client.get_run(outage.run_id)
    assert run.info.status == "FINISHED"
    logged = {artifact.path for artifact in outage.client.list_artifacts(outage.run_id, "model")}
    assert {"model/model.safetensors", "model/config.yaml", "model/package.json"} <= logged
    assert RunRecord.read(outage.output).pending_model_package is None
