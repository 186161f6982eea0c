"""`mplug demo`, the README's main job, run as a user runs it, tracking into a real `mlflow server`:
the synthetic URL list is downloaded, a tokenizer trained, the tiny model pretrained on 2 ranks,
and every task fine-tuned from the pretraining run beats its baseline and leads back to that run.
The fine-tuned models then answer through `mplug predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from PIL import Image

from finetune.trainer import TAG_INIT, TAG_PARENT, TAG_TASK

TASKS = ("vqa", "caption", "retrieval", "grounding")
DEMO_TIMEOUT_S = 40 * 60
CLEAR_MARGIN = 1.5  # each task's metric at least this many times its chance baseline


def mplug(*args: str, store: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def demo(server, tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    result = mplug("demo", "--output", str(output), store=server.uri, timeout=DEMO_TIMEOUT_S)
    report = json.loads((output / "report.json").read_text())
    return {"output": output, "report": report, "stdout": result.stdout, "store": server.uri}


@pytest.mark.slow
def test_the_demo_reports_every_task_above_its_baseline(demo):
    tasks = demo["report"]["tasks"]
    assert sorted(tasks) == sorted(TASKS)
    for task, result in tasks.items():
        assert result["value"] > result["baseline"], (task, result)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_each_task_fine_tuned_from_the_pretraining_run_beats_its_baseline_by_half_again(demo, task):
    # Seen in runs so far: 2.4x-7.9x; the tokenizer's word pieces vary from process to process.
    result = demo["report"]["tasks"][task]
    assert result["value"] >= CLEAR_MARGIN * result["baseline"], result


@pytest.mark.slow
def test_the_demo_prints_the_table_and_how_to_browse_the_runs(demo):
    out = demo["stdout"]
    for task in TASKS:
        metric = demo["report"]["tasks"][task]["metric"]
        assert any(line.split()[:2] == [task, metric] for line in out.splitlines()), (task, out[-2000:])
    assert demo["report"]["tracking_uri"] == demo["store"]
    assert f"open {demo['store']} in a browser" in out
    for stage in ("[1/9] synthetic data", "[2/9] download", "[4/9] pretrain", "[9/9] finetune grounding"):
        assert stage in out


@pytest.mark.slow
def test_the_pretraining_run_trained_on_two_ranks_with_zero_2_to_the_last_step(demo):
    client = mlflow.MlflowClient(tracking_uri=demo["store"])
    run = client.get_run(demo["report"]["pretrain_run_id"])
    steps, every = demo["report"]["settings"]["pretrain_steps"], int(run.data.params["train.log_every"])
    assert run.data.params["train.zero_stage"] == "2"
    assert run.info.status == "FINISHED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "itc")] == list(
        range(every, steps + 1, every))
    last = demo["output"] / "pretrain" / "checkpoints" / f"step_{steps:08d}"
    assert json.loads((last / "complete.json").read_text())["world_size"] == 2
    assert sorted(path.name for path in last.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_the_fine_tuning_run_and_its_registered_version_name_the_pretraining_run(demo, task):
    result, parent = demo["report"]["tasks"][task], demo["report"]["pretrain_run_id"]
    client = mlflow.MlflowClient(tracking_uri=demo["store"])
    run = client.get_run(result["run_id"])
    assert run.data.tags[TAG_PARENT] == parent
    assert run.data.tags[TAG_TASK] == task
    assert run.data.tags[TAG_INIT] == f"runs:/{parent}/model"
    assert run.data.metrics[f"eval/{result['metric']}"] == pytest.approx(result["value"])
    name, version = result["registered"].split("/")
    assert name == f"mplug-{task}"
    registered = client.get_model_version(name, version)
    assert registered.run_id == result["run_id"]
    assert registered.tags[TAG_PARENT] == parent


def a_validation_image(demo):
    return next((demo["output"] / "synthetic" / "images" / "val2014").glob("*.jpg"))


@pytest.mark.slow
def test_predict_answers_a_question_about_an_image_file(demo):
    name, version = demo["report"]["tasks"]["vqa"]["registered"].split("/")
    result = mplug("predict", "--model", f"models:/{name}/{version}", "--image", str(a_validation_image(demo)),
                   "--question", "how many shapes are there?", store=demo["store"])
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["question"] == "how many shapes are there?"
    answer_list = demo["output"] / "synthetic" / "annotations" / "answer_list.json"
    assert answer["answer"] in json.loads(answer_list.read_text())


@pytest.mark.slow
def test_predict_draws_the_found_box_on_a_copy_of_the_image(demo, tmp_path):
    image = a_validation_image(demo)
    run_id = demo["report"]["tasks"]["grounding"]["run_id"]
    result = mplug("predict", "--model", f"runs:/{run_id}/model", "--image", str(image),
                   "--expression", "the red circle", "--output", str(tmp_path / "box.png"), store=demo["store"])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    x0, y0, x1, y1 = found["box_xyxy"]
    assert 0 <= x0 <= x1 <= found["image_size"] and 0 <= y0 <= y1 <= found["image_size"]
    assert Image.open(tmp_path / "box.png").size == Image.open(image).size


def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "is not empty and was not written by `mplug demo`" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
