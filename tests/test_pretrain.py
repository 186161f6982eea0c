"""`mplug pretrain`: DeepSpeed ZeRO on 2 CPU ranks, checkpoints, exact resume, preemption, MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import train_wordpiece
from pretrain.checkpoint import COMPLETE, complete_checkpoints
from pretrain.package import load_package

SCENES = 96
SHARD_SIZE = 20


@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory):
    """Synthetic pairs in uneven shards, and a tokenizer trained on their captions."""
    root = tmp_path_factory.mktemp("pretrain-data")
    scenes = make_scenes(SCENES, seed=7, size=64)
    with ShardWriter(str(root / "shards"), shard_size=SHARD_SIZE) as writer:
        for index, scene in enumerate(scenes):
            writer.write(Sample(f"{index:06d}", encode_jpeg(scene.image), text=scene.caption))
    counts = [min(SHARD_SIZE, SCENES - i * SHARD_SIZE) for i in range(len(writer.shards))]
    write_manifest(str(root / "shards"), [ShardInfo(u, c) for u, c in zip(writer.shards, counts, strict=True)])
    train_wordpiece(vocabulary_texts() + [s.caption for s in scenes], root / "tokenizer", vocab_size=200)
    return root


def pretrain_command(data: Path, output: Path, steps: int, *extra: str, nproc: int | None = 2) -> list[str]:
    command = [sys.executable, "-m", "cluster.cli", "pretrain", "--config", "tiny", "--data", str(data / "shards"),
               "--output", str(output), "--max-steps", str(steps), "--tokenizer", str(data / "tokenizer"),
               "--set", "model.queue_size=32", *extra]
    return command + (["--nproc-per-node", str(nproc)] if nproc else [])


def run(command: list[str], output: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}
    env.pop("RANK", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_id(output: Path) -> str:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    (run_info,) = client.search_runs(client.search_experiments()[0].experiment_id)
    return run_info.info.run_id


def metric_steps(output: Path, key: str) -> list[int]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    return sorted(point.step for point in client.get_metric_history(run_id(output), key))


def metric_values(output: Path, key: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    return [p.value for p in sorted(client.get_metric_history(run_id(output), key), key=lambda p: p.step)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_saves_and_resumes_on_2_cpu_ranks(pretraining_data, tmp_path, stage):
    output = tmp_path / f"zero{stage}"
    zero = ["--set", f"train.zero_stage={stage}", "--set", "train.checkpoint_every=3"]
    run(pretrain_command(pretraining_data, output, 4, *zero), output)
    assert [p.name for p in complete_checkpoints(output)] == ["step_00000003", "step_00000004"]
    run(pretrain_command(pretraining_data, output, 6, *zero, "--resume", "auto"), output)
    assert [p.name for p in complete_checkpoints(output)] == ["step_00000004", "step_00000006"]  # keep 2
    assert metric_steps(output, "loss") == [1, 2, 3, 4, 5, 6]
    weights = load_file(output / "package" / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    if stage == 2:  # the MLflow `model/` artifact is the package, and it loads back into the same model
        artifact = mlflow.artifacts.download_artifacts(f"runs:/{run_id(output)}/model", dst_path=str(tmp_path / "dl"),
                                                       tracking_uri=f"sqlite:///{output}/mlflow.db")
        logged, local = load_package(artifact), load_package(output / "package")
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(logged.model.encode_image(images), local.model.encode_image(images), rtol=0, atol=0)


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "package" / "model.safetensors")


def test_resume_after_sigterm_ends_with_the_weights_of_an_uninterrupted_run(pretraining_data, tmp_path):
    exact = ["--set", "data.shuffle_buffer=0", "--set", "train.checkpoint_every=100"]
    straight = tmp_path / "straight"
    run(pretrain_command(pretraining_data, straight, 12, *exact, nproc=None), straight)

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{interrupted}/mlflow.db"}
    process = subprocess.Popen(pretrain_command(pretraining_data, interrupted, 12, *exact, nproc=None), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # stop it once a few steps are done
        if "step 4/12" in line:
            process.send_signal(signal.SIGTERM)
            break
    remaining = process.communicate(timeout=300)[0]
    assert process.returncode == 0, remaining[-3000:]
    (stopped,) = complete_checkpoints(interrupted)
    assert 4 <= int(stopped.name.split("_")[1]) < 12
    assert not (interrupted / "package").exists()
    run(pretrain_command(pretraining_data, interrupted, 12, *exact, "--resume", "auto", nproc=None), interrupted)

    expected, resumed = final_weights(straight), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    worst = max((expected[k].float() - resumed[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6


def test_a_complete_marker_is_what_makes_a_checkpoint_resumable(pretraining_data, tmp_path):
    output = tmp_path / "run"
    run(pretrain_command(pretraining_data, output, 2, "--set", "train.checkpoint_every=1", nproc=None), output)
    newest = complete_checkpoints(output)[-1]
    (newest / COMPLETE).unlink()  # as if the run died while writing it
    assert complete_checkpoints(output)[-1].name == "step_00000001"
    result = run(pretrain_command(pretraining_data, output, 3, "--resume", "auto", nproc=None), output)
    assert "resumed from" in result.stderr and "step_00000001" in result.stderr


def test_after_kill_9_resume_auto_continues_from_the_last_periodic_checkpoint(pretraining_data, tmp_path):
    output = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}
    command = pretrain_command(pretraining_data, output, 30, "--set", "train.checkpoint_every=2", nproc=None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "step 5/30" in line:
            process.kill()
            break
    process.wait(timeout=60)
    newest = int(complete_checkpoints(output)[-1].name.split("_")[1])
    assert newest >= 4 and newest % 2 == 0
    result = run(pretrain_command(pretraining_data, output, newest + 2, "--resume", "auto", nproc=None), output)
    assert f"at step {newest}" in result.stderr
    assert f"step {newest + 1}/{newest + 2}" in result.stderr


POISONED_RUN = """
import sys
from pathlib import Path
from pretrain.launch import init_distributed, place_from_environment, use_cpu_accelerator_without_gpu
use_cpu_accelerator_without_gpu()
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.models.weights import load_tokenizer
from pretrain.objectives.pretraining import MPLUGPretraining
from pretrain.trainer import RunOptions, Trainer

data, output, steps, poisoned, max_nonfinite = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4]), sys.argv[5]

class Poisoned(MPLUGPretraining):
    calls = 0
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        Poisoned.calls += 1
        if poisoned(Poisoned.calls):
            out.loss = out.loss * float("nan")
        return out

tokenizer = load_tokenizer(Path(data) / "tokenizer")
config = with_tokenizer(load_config("tiny", ["model.queue_size=32", f"train.max_nonfinite={max_nonfinite}"]), tokenizer)
place = place_from_environment()
init_distributed(place)
options = RunOptions(data=str(Path(data) / "shards"), output=output, max_steps=steps)
sys.exit(Trainer(config, options, place, tokenizer, model=Poisoned(config)).run())
"""


def poisoned_run(data: Path, output: Path, steps: int, poisoned: str, max_nonfinite: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-c", POISONED_RUN, str(data), str(output), str(steps), poisoned,
                           str(max_nonfinite)], capture_output=True, text=True, timeout=600, env=env)


def test_a_non_finite_loss_is_skipped_and_counted(pretraining_data, tmp_path):
    output = tmp_path / "nan"
    result = poisoned_run(pretraining_data, output, 5, "lambda call: call == 3", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "non-finite loss at step 2: skipped (1 in a row, 1 in all)" in result.stderr
    assert metric_steps(output, "loss") == [1, 2, 3, 4, 5]
    assert metric_values(output, "nonfinite_skipped") == [0, 0, 1, 1, 1]


def test_non_finite_losses_in_a_row_checkpoint_and_stop_the_run(pretraining_data, tmp_path):
    output = tmp_path / "nan-stop"
    result = poisoned_run(pretraining_data, output, 10, "lambda call: call >= 3", 3)
    assert result.returncode == 3
    assert "stopping: 3 non-finite losses in a row at step 2; checkpoint saved" in result.stderr
    assert [p.name for p in complete_checkpoints(output)][-1] == "step_00000002"


def test_estimate_memory_prints_the_parts_per_rank_without_building_the_model():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "pretrain", "--config", "huge", "--estimate-memory",
                             "--world-size", "8", "--zero-stage", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for part in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert part in result.stdout.lower()
