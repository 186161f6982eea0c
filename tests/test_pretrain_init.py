"""`mplug pretrain --init PACKAGE`: pretraining that starts from a model package's config, weights,
momentum copies, ITC queue and tokenizer."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save

from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
from data_prep.synthetic import make_scenes
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.init_package import (
    TAG_INIT,
    TAG_PARENT,
    InitError,
    pretraining_from_package,
    run_config,
)
from pretrain.models.mplug import MPLUG
from pretrain.objectives.itc import FeatureQueue
from pretrain.package import QUEUE_FILE, export_package

SCENES = 16  # two batches of the tiny preset
PACKAGE_MODEL = ("model.queue_size=32", "model.momentum=0.9")  # the preset has 64 and 0.995
PARENT_RUN = "0123456789abcdef"


def write_package(directory: Path, tokenizer, *overrides: str, momentum: bool = True,
                  queue: dict[str, torch.Tensor] | None = None) -> Path:
    """A tiny package of random weights, as `mplug import` or a pretraining writes one."""
    config = with_tokenizer(load_config("tiny", overrides), tokenizer)
    torch.manual_seed(5)
    files = {QUEUE_FILE: save(queue)} if queue is not None else None
    return export_package(directory, MPLUG(config.model, momentum=momentum), config, tokenizer, run_id=PARENT_RUN,
                          files=files)


def filled_queue(embed_dim: int, size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    queue = FeatureQueue(embed_dim, size)
    queue.ids.copy_(torch.arange(size))
    queue.ptr.fill_(3)
    queue.filled.fill_(size)
    return {name: t.clone() for name, t in queue.state_dict().items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init-shards")
    with ShardWriter(str(root), shard_size=SCENES) as writer:
        for index, scene in enumerate(make_scenes(SCENES, seed=9, size=64)):
            writer.write(Sample(f"{index:06d}", encode_jpeg(scene.image), text=scene.caption))
    return root


@pytest.fixture(scope="module")
def package(tmp_path_factory, tokenizer) -> Path:
    return write_package(tmp_path_factory.mktemp("init") / "package", tokenizer, *PACKAGE_MODEL)


def pretrain(shards: Path, output: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cluster.cli", "pretrain", "--config", "tiny", "--data", str(shards),
               "--output", str(output), "--max-steps", str(steps), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}
    env.pop("RANK", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def only_run(output: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    return run


@pytest.fixture(scope="module")
def zero_step_run(tmp_path_factory, shards, package) -> tuple[Path, str]:
    """`mplug pretrain --init PACKAGE --max-steps 0`: the package of the init, without --tokenizer."""
    output = tmp_path_factory.mktemp("zero-steps")
    return output, pretrain(shards, output, 0, "--init", str(package)).stderr


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, shards, package) -> Path:
    output = tmp_path_factory.mktemp("two-steps")
    pretrain(shards, output, 2, "--init", str(package), "--set", "train.checkpoint_every=2")
    return output


# ---------------------------------------------------------------------------------------------
# Through the command


@pytest.mark.slow  # through the `zero_step_run` fixture
def test_zero_steps_from_init_write_the_package_weights_unchanged(zero_step_run, package):
    output, _ = zero_step_run
    expected, written = load_file(package / "model.safetensors"), load_file(output / "package" / "model.safetensors")
    assert written.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(written[name], expected[name])] == []


@pytest.mark.slow  # through the `zero_step_run` fixture
def test_the_run_uses_the_package_model_config_and_tokenizer(zero_step_run, package, tokenizer):
    output, _ = zero_step_run
    written = load_config(str(output / "package" / "config.yaml")).model
    assert (written.queue_size, written.momentum, written.text.vocab_size) == (32, 0.9, len(tokenizer))
    vocab = json.loads((output / "package" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == json.loads((package / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]


@pytest.mark.slow  # through the `zero_step_run` fixture
def test_model_values_that_differ_from_the_preset_are_logged(zero_step_run):
    _, stderr = zero_step_run
    assert "2 values differ (preset -> run): model.momentum: 0.995 -> 0.9; model.queue_size: 64 -> 32" in stderr


@pytest.mark.slow  # through the `zero_step_run` fixture
def test_the_mlflow_run_is_tagged_with_the_init_package_and_its_run(zero_step_run, package):
    output, _ = zero_step_run
    tags = only_run(output).data.tags
    assert (tags[TAG_INIT], tags[TAG_PARENT]) == (str(package), PARENT_RUN)


@pytest.mark.slow
def test_training_steps_from_init_have_finite_losses(two_step_run):
    history = mlflow.MlflowClient(tracking_uri=f"sqlite:///{two_step_run}/mlflow.db").get_metric_history(
        only_run(two_step_run).info.run_id, "loss")
    assert sorted(point.step for point in history) == [1, 2]
    assert all(math.isfinite(point.value) for point in history)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_and_ignores_init(two_step_run, shards, package, tmp_path):
    output = tmp_path / "resumed"
    shutil.copytree(two_step_run, output)
    stderr = pretrain(shards, output, 3, "--init", str(package), "--resume", "auto").stderr
    assert f"--init {package} ignored" in stderr and "resumed from" in stderr and "step_00000002" in stderr
    history = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db").get_metric_history(
        only_run(output).info.run_id, "loss")
    assert sorted(point.step for point in history) == [1, 2, 3]


def test_a_missing_init_folder_is_an_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-package"
    code = main(["pretrain", "--config", "tiny", "--data", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--init", str(missing)])
    assert code == 2
    assert f"--init {missing}: no such folder" in capsys.readouterr().err


def test_an_mlflow_uri_is_refused_with_the_way_to_use_it(tmp_path, capsys):
    code = main(["pretrain", "--config", "tiny", "--data", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--init", "runs:/abc/model"])
    error = capsys.readouterr().err
    assert code == 2
    assert "`mplug finetune --init`" in error and "mlflow artifacts download --artifact-uri runs:/abc/model" in error


# ---------------------------------------------------------------------------------------------
# The config and the model, in process


def test_set_model_overrides_apply_on_top_of_the_package_model_config(package):
    config, differences = run_config("tiny", ["model.momentum=0.5", "train.lr=0.1"], package)
    assert (config.model.momentum, config.model.queue_size, config.train.lr) == (0.5, 32, 0.1)
    assert differences == ["model.queue_size: 64 -> 32"]  # the --set value is the preset's too


def test_a_set_that_changes_a_size_is_refused(package, tokenizer):
    config, _ = run_config("tiny", ["model.fusion.layers=4"], package)
    with pytest.raises(InitError, match=r"do not fit the run's model: .* missing \(fusion\.layers\.3"):
        pretraining_from_package(package, with_tokenizer(config, tokenizer))


def test_momentum_copies_start_equal_to_the_online_weights_when_the_package_has_none(tmp_path, tokenizer):
    package = write_package(tmp_path / "online-only", tokenizer, momentum=False)
    config, _ = run_config("tiny", [], package)
    model = pretraining_from_package(package, with_tokenizer(config, tokenizer)).model
    online = model.vision.state_dict()
    assert all(torch.equal(t, online[name]) for name, t in model.momentum.vision.state_dict().items())


def test_the_package_itc_queue_is_loaded_when_its_size_is_the_runs(tmp_path, tokenizer):
    stored = filled_queue(embed_dim=32, size=32)
    package = write_package(tmp_path / "queued", tokenizer, *PACKAGE_MODEL, queue=stored)
    config, _ = run_config("tiny", [], package)
    queue = pretraining_from_package(package, with_tokenizer(config, tokenizer)).queue.state_dict()
    assert all(torch.equal(queue[name], stored[name]) for name in stored)


def test_an_itc_queue_of_another_size_is_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    package = write_package(tmp_path / "queued", tokenizer, *PACKAGE_MODEL, queue=filled_queue(32, 32))
    config, _ = run_config("tiny", ["model.queue_size=64"], package)
    queue = pretraining_from_package(package, with_tokenizer(config, tokenizer)).queue
    assert (queue.size, int(queue.filled)) == (64, 0)
    assert "does not fit the run's" in caplog.text
