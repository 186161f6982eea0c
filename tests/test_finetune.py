"""`mplug finetune` and `mplug predict` against a real `mlflow server`: every task, fine-tuned from the
pretraining run's runs:/ URI, beats its baseline twice over and leads back to that run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from PIL import Image

from data_prep.synthetic import vocabulary_texts
from data_prep.synthetic_task_shards import write_task_shards
from data_prep.tokenizer import train_wordpiece
from finetune.trainer import TAG_INIT, TAG_PARENT, TAG_TASK

PRETRAIN_STEPS = 300
SCENES = 300  # 1,200 training captions and questions, ~900 expressions: enough to generalise from
FINETUNE_DATA = {"vqa": "vqa", "caption": "caption", "retrieval": "caption", "grounding": "grounding"}


def mplug(*args: str, store: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_shards(tmp_path_factory.mktemp("finetune-data"), scenes=SCENES)


@pytest.fixture(scope="module")
def pretrained(server, data, tmp_path_factory):
    """A tiny model pretrained on the synthetic captions, tracked by the server."""
    root = tmp_path_factory.mktemp("finetune")
    train_wordpiece(vocabulary_texts(), root / "tokenizer", vocab_size=200)
    mplug("pretrain", "--config", "tiny", "--data", str(data.caption / "train"), "--output", str(root / "pretrain"),
          "--max-steps", str(PRETRAIN_STEPS), "--tokenizer", str(root / "tokenizer"), "--set", "train.log_every=50",
          "--set", "train.checkpoint_every=1000", store=server.uri)
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mplug").experiment_id],
                                filter_string="tags.`mplug.stage` = 'pretrain'")
    return {"root": root, "store": server.uri, "run_id": run.info.run_id, "finetuned": {}}


def finetuned(task: str, pretrained: dict, data) -> dict:
    """metrics.json of `task` fine-tuned from the pretraining run (once per module)."""
    if task not in pretrained["finetuned"]:
        output = pretrained["root"] / task
        mplug("finetune", task, "--init", f"runs:/{pretrained['run_id']}/model", "--data",
              str(getattr(data, FINETUNE_DATA[task])), "--output", str(output), "--preset", "tiny",
              store=pretrained["store"])
        pretrained["finetuned"][task] = json.loads((output / "metrics.json").read_text())
    return pretrained["finetuned"][task]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa", "caption", "retrieval", "grounding"])
def test_each_task_fine_tuned_from_the_pretraining_run_beats_its_baseline_twice_over(task, pretrained, data):
    metrics = finetuned(task, pretrained, data)
    assert metrics["value"] >= 2 * metrics["baseline"], metrics


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa", "grounding"])
def test_the_fine_tuning_run_and_its_registered_version_name_the_pretraining_run(task, pretrained, data):
    metrics = finetuned(task, pretrained, data)
    client = mlflow.MlflowClient(tracking_uri=pretrained["store"])
    run = client.get_run(metrics["run_id"])
    assert run.data.tags[TAG_PARENT] == pretrained["run_id"]
    assert run.data.tags[TAG_TASK] == task
    assert run.data.tags[TAG_INIT] == f"runs:/{pretrained['run_id']}/model"
    assert run.data.metrics[f"eval/{metrics['metric']}"] == pytest.approx(metrics["value"])
    name, version = metrics["registered"].split("/")
    assert name == f"mplug-{task}"
    registered = client.get_model_version(name, version)
    assert registered.run_id == metrics["run_id"]
    assert registered.tags[TAG_PARENT] == pretrained["run_id"]


@pytest.mark.slow
def test_predict_answers_a_question_about_an_image_file(pretrained, data):
    metrics = finetuned("vqa", pretrained, data)
    image = next((data.root / "synthetic" / "images" / "val2014").glob("*.jpg"))
    name, version = metrics["registered"].split("/")
    result = mplug("predict", "--model", f"models:/{name}/{version}", "--image", str(image), "--question",
                   "how many shapes are there?", store=pretrained["store"])
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["question"] == "how many shapes are there?"
    assert answer["answer"] in json.loads(data.answer_list.read_text())


@pytest.mark.slow
def test_predict_draws_the_found_box_on_a_copy_of_the_image(pretrained, data, tmp_path):
    metrics = finetuned("grounding", pretrained, data)
    image = next((data.root / "synthetic" / "images" / "val2014").glob("*.jpg"))
    result = mplug("predict", "--model", f"runs:/{metrics['run_id']}/model", "--image", str(image),
                   "--expression", "the red circle", "--output", str(tmp_path / "box.png"), store=pretrained["store"])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    x0, y0, x1, y1 = found["box_xyxy"]
    assert 0 <= x0 <= x1 <= found["image_size"] and 0 <= y0 <= y1 <= found["image_size"]
    assert Image.open(tmp_path / "box.png").size == Image.open(image).size


def test_an_init_uri_that_does_not_exist_is_a_clear_error(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = mplug("finetune", "vqa", "--init", "runs:/0123456789abcdef/model", "--data", str(tmp_path),
                   "--output", str(tmp_path / "out"), "--preset", "tiny", store=store, check=False)
    assert result.returncode == 2
    assert "no run '0123456789abcdef' in the tracking store" in result.stderr
    result = mplug("finetune", "vqa", "--init", str(tmp_path / "nowhere"), "--data", str(tmp_path),
                   "--output", str(tmp_path / "out"), "--preset", "tiny", store=store, check=False)
    assert result.returncode == 2
    assert "does not exist; give a model package folder" in result.stderr


def test_an_unknown_task_setting_is_a_configuration_error_naming_the_valid_keys(tmp_path):
    result = mplug("finetune", "vqa", "--init", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path),
                   "--set", "task.beam=3", store=f"sqlite:///{tmp_path}/mlflow.db", check=False)
    assert result.returncode == 2
    assert "task has no key 'beam'" in result.stderr and "beams" in result.stderr
