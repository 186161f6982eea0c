"""`mplug submit ray`: jobs on a real local Ray head (tests/ray_cluster.py), started once for the module.

The head uses token authentication with a token of its own; the tests reach it as a user on
the head's machine would, with RAY_AUTH_TOKEN set. `mplug submit` runs in this process (its
start-up would cost seconds per call); the jobs' commands are real `mplug` processes on Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from ray_cluster import RAY, RayHead

from cluster.cli import main
from cluster.ray_jobs import DEFAULT_ENV, SubmitError, build_runtime_env, entrypoint
from data_prep.manifest import ShardInfo, read_manifest, write_manifest
from data_prep.serve import LoopbackServer
from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.synthetic_export import write_synthetic
from data_prep.tokenizer import train_wordpiece
from pretrain.checkpoint import COMPLETE, complete_checkpoints
from pretrain.launch import free_port

IMAGES = 20
SHARD_SIZE = 8  # 3 shards: 8, 8, 4
JOB_PREFIX = "raysubmit_"
EXAMPLE = Path(__file__).resolve().parents[1] / "cluster" / "examples" / "ray-cluster.yaml"
CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                    "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if not RAY.exists():
        pytest.skip(f"the ray command is not installed beside the test's Python ({RAY})")
    with RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=2) as running:
        yield running


@pytest.fixture
def client_env(head, monkeypatch):
    """This process as a client of the head: its token, and nothing from the shell pointing elsewhere."""
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in head.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def submit(head, *args: str) -> int:
    return main(["submit", "ray", "--address", head.address, *args])


# ---------------------------------------------------------------------------------------------
# Jobs on the cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_download_job_joins_the_cluster_and_writes_every_shard(head, client_env, tmp_path, capsys):
    site, output = tmp_path / "site", tmp_path / "shards"
    port = free_port()
    dataset = write_synthetic(site, IMAGES, seed=5, image_size=32, base_url=f"http://127.0.0.1:{port}")
    with LoopbackServer(site, port=port) as server:
        code = submit(head, "--follow", "--", "mplug", "data", "download", str(dataset.urls_parquet),
                      "--output", str(output), "--shard-size", str(SHARD_SIZE),
                      "--image-size", "32", "--threads", "4", "--no-progress")
        requests = server.requests
    out = capsys.readouterr().out
    assert code == 0, out[-5000:]
    assert out.splitlines()[0].startswith(JOB_PREFIX)
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["count"], summary["success"], summary["failures"]) == (IMAGES, IMAGES, {})
    assert summary["shards"] == summary["expected_shards"] == 3
    shards, fields = read_manifest(str(output / "manifest.json"))
    assert [(Path(s.url).name, s.count) for s in shards] == [("00000.tar", 8), ("00001.tar", 8), ("00002.tar", 4)]
    assert fields["count"] == IMAGES
    assert sorted(requests) == sorted(p.relative_to(site).as_posix() for p in site.rglob("*.jpg"))
    assert set(requests.values()) == {1}


@pytest.mark.slow
def test_follow_streams_the_job_log_and_returns_the_driver_exit_code(head, client_env, capsys):
    code = submit(head, "--follow", "--", "python", "-c", "print('hello from the job'); raise SystemExit(3)")
    captured = capsys.readouterr()
    assert code == 3
    assert "hello from the job" in captured.out
    assert "FAILED" in captured.err


@pytest.mark.slow
def test_the_job_sees_the_default_passed_through_and_given_variables(head, client_env, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    show = "import os; print('seen', [os.environ.get(k) for k in ('NO_ALBUMENTATIONS_UPDATE', " \
           "'MLFLOW_TRACKING_URI', 'MPLUG_GREETING')])"
    code = submit(head, "--follow", "--env", "MPLUG_GREETING=a=b", "--", "python", "-c", show)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "seen ['1', 'http://tracking.example:5000', 'a=b']" in out


@pytest.mark.slow  # the head's start: ~15 s
def test_without_the_clusters_token_the_error_says_what_to_set(head, client_env, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(SystemExit) as error:
        submit(head, "--", "echo", "hi")
    message = str(error.value)
    assert f"the Ray cluster at {head.address} refused the request" in message
    assert "we sent no token" in message
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN" in message


def test_an_unreachable_address_is_an_error_naming_it(monkeypatch):
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SystemExit) as error:
        main(["submit", "ray", "--address", address, "--", "echo", "hi"])
    message = str(error.value)
    assert f"cannot reach the Ray Jobs API at {address}" in message
    assert "dashboard address" in message


# ---------------------------------------------------------------------------------------------
# Training on Ray Train
# ---------------------------------------------------------------------------------------------

STEPS = 3
SHOW_PLACE = ("import os, sys; e = os.environ; "
              "print('place', *(e[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'))); "
              "sys.exit(4 + int(e['RANK']))")


@pytest.mark.slow
def test_ray_train_workers_run_the_command_as_ranks_of_one_job_and_it_exits_with_rank_0s_code(
        head, client_env, capsys):
    code = submit(head, "--follow", "--workers", "2", "--", "python", "-c", SHOW_PLACE)
    out = capsys.readouterr().out
    places = sorted(re.findall(r"place (\d+) (\d+) (\d+) (\S+) (\d+)", out))
    assert [p[:3] for p in places] == [("0", "2", "0"), ("1", "2", "1")], out[-5000:]
    assert places[0][3:] == places[1][3:]  # one rendezvous: rank 0's address and port
    assert code == 4  # both failed (4 and 5): the first rank's code


@pytest.fixture
def pretraining_data(tmp_path):
    scenes = make_scenes(32, seed=7, size=64)
    with ShardWriter(str(tmp_path / "shards"), shard_size=16) as writer:
        for index, scene in enumerate(scenes):
            writer.write(Sample(f"{index:06d}", encode_jpeg(scene.image), text=scene.caption))
    write_manifest(str(tmp_path / "shards"), [ShardInfo(url, 16) for url in writer.shards])
    train_wordpiece(vocabulary_texts() + [s.caption for s in scenes], tmp_path / "tokenizer", vocab_size=200)
    return tmp_path


@pytest.mark.slow
def test_two_ray_train_workers_are_the_two_ranks_of_one_pretraining(head, client_env, pretraining_data, monkeypatch,
                                                                     capsys):
    output = pretraining_data / "run"
    tracking = f"sqlite:///{pretraining_data / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # passed to the job by default
    code = submit(head, "--follow", "--workers", "2", "--cpus-per-worker", "1", "--",
                  "mplug", "pretrain", "--config", "tiny", "--data", str(pretraining_data / "shards"),
                  "--output", str(output), "--tokenizer", str(pretraining_data / "tokenizer"),
                  "--max-steps", str(STEPS), "--set", "train.log_every=1", "--set", f"train.checkpoint_every={STEPS}",
                  "--set", "model.queue_size=32")
    out = capsys.readouterr().out
    assert code == 0, out[-5000:]
    (checkpoint,) = complete_checkpoints(output)
    assert json.loads((checkpoint / COMPLETE).read_text()) == {"step": STEPS, "world_size": 2}
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# What is submitted
# ---------------------------------------------------------------------------------------------


def test_workers_run_the_command_through_the_ray_train_entry():
    entry = entrypoint(["mplug", "pretrain", "--config", "tiny"], workers=4, gpus_per_worker=1, cpus_per_worker=None)
    assert entry == ("python -m cluster.ray_train --workers 4 --gpus-per-worker 1 --cpus-per-worker 1 -- "
                     "mplug pretrain --config tiny")


def test_nproc_per_node_under_workers_is_refused():
    with pytest.raises(SubmitError, match="leave --nproc-per-node out"):
        entrypoint(["mplug", "pretrain", "--nproc-per-node=8"], workers=2, gpus_per_worker=None, cpus_per_worker=None)


def test_the_runtime_env_file_is_extended_by_the_flags_which_win(tmp_path):
    spec = tmp_path / "env.yaml"
    spec.write_text("pip: [numpy]\nenv_vars: {A: from-file, B: from-file, NO_ALBUMENTATIONS_UPDATE: '0'}\n")
    runtime_env = build_runtime_env(spec, str(tmp_path), ["einops"], ["B=from-flag"],
                                    {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HOME": "/root"})
    assert runtime_env == {
        "pip": ["einops"],
        "working_dir": str(tmp_path),
        "env_vars": {**DEFAULT_ENV, "MLFLOW_TRACKING_URI": "http://mlflow:5000", "A": "from-file", "B": "from-flag",
                     "NO_ALBUMENTATIONS_UPDATE": "0"},
    }


def test_an_env_flag_without_a_value_is_an_error_that_shows_it():
    with pytest.raises(SubmitError, match="--env expects KEY=VALUE, got 'TOKEN'"):
        build_runtime_env(None, None, [], ["TOKEN"], {})


def test_the_cluster_example_is_a_config_ray_up_accepts():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(EXAMPLE.read_text()))  # what `ray up` does first
    validate_config(config)
    assert config["head_node_type"] == "head"
    assert any("pip install ~/mplug" in command for command in config["setup_commands"])
