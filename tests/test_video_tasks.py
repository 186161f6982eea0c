"""The video tasks on the tiny mPLUG-2 and synthetic moving-shape clips: each trains and evaluates to
its metric and baseline, action classification's head and class names travel in the task package,
and `mplug predict --video` answers, captions, scores texts and names the top classes of a clip."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_task_caption import cider_only

from data_prep.batch import normalize
from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.synthetic_video import (
    DIRECTIONS,
    encode_mp4,
    make_clip,
    vocabulary_texts,
    write_video_task_shards,
)
from data_prep.tokenizer import train_wordpiece
from finetune.cli import main as mplug
from finetune.config import load_finetune_config
from finetune.predict import load_task_package
from finetune.registry import task_class
from finetune.tasks import caption as caption_module
from finetune.tasks.action_classification import ActionClassificationTask, ActionSettings
from finetune.tasks.base import TASK_WEIGHTS_FILE, EvalContext
from finetune.tasks.retrieval import RetrievalSettings
from finetune.tasks.video_caption import VideoCaptionSettings, VideoCaptionTask, with_image_ids
from finetune.tasks.video_qa import VideoQASettings, VideoQATask, split_answers
from finetune.tasks.video_retrieval import VideoRetrievalTask
from finetune.tasks.vqa import VQASettings, VQATask
from finetune.trainer import FinetuneTrainer
from pretrain.config import load_config, to_dict
from pretrain.config.tokens import with_tokenizer
from pretrain.models.factory import build_mplug
from pretrain.package import export_state_dict

FRAMES = 4  # mplug2_tiny's data.frames
SIZE = 64  # its image size
BATCH = 8
STEPS = 4  # a few steps: the tasks must train, not learn (learning is test_mplug2_pipeline's)
LR = 3e-4
VIDEO_TASKS = ("video_qa", "video_caption", "video_retrieval", "action_classification")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return write_video_task_shards(tmp_path_factory.mktemp("video-tasks"), seed=1, frames=8, size=SIZE,
                                   train_clips=16, eval_clips=6)


@pytest.fixture(scope="module")
def video_tokenizer(tmp_path_factory):
    return train_wordpiece(vocabulary_texts(), tmp_path_factory.mktemp("video-tokenizer"), vocab_size=200)


@pytest.fixture(scope="module")
def config(video_tokenizer):
    return with_tokenizer(load_config("mplug2_tiny"), video_tokenizer)


def build(task_cls, settings, config, tokenizer, *, momentum: bool = False):
    torch.manual_seed(0)
    return task_cls(build_mplug(config.model, momentum=momentum), settings, tokenizer)


def batches(task, tokenizer, split: Path, *, train: bool):
    settings = {"batch_size": BATCH, "image_size": SIZE, "frames": FRAMES, "workers": 0, "shuffle_buffer": 0,
                "mode": "resampled" if train else "epoch", "pad_to_max": True, "max_text_length": 24}
    loader_config = LoaderConfig(**{**settings, **task.loader_fields(train)})  # as the trainer: the task's win
    for batch in ShardLoader(str(split), loader_config, tokenizer=tokenizer):
        yield {**batch, "images": normalize(batch["images"])}


def train_and_evaluate(task, tokenizer, data: Path, output: Path) -> dict[str, float]:
    task.prepare_data(data, "train")
    optimizer = torch.optim.AdamW(task.parameters(), lr=LR)
    for step, batch in enumerate(itertools.islice(batches(task, tokenizer, data / "train", train=True), STEPS)):
        loss = task(batch, step).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()
    return task.evaluate(batches(task, tokenizer, data / "val", train=False), EvalContext(output))


def export_task(task, config, tokenizer, folder: Path) -> Path:
    """The task's model package as `mplug finetune` writes it (FinetuneTrainer.export_package)."""
    state = task.state_dict()
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return export_state_dict(folder, model_state, config, tokenizer, step=STEPS,
                             extra={"task": task.name, "task_settings": to_dict(task.settings)},
                             files=task.package_files(state))


def a_clip(path: Path, direction: str = "left") -> Path:
    rng = random.Random(0)
    clip = make_clip(rng, frames=8, size=SIZE)
    while clip.direction != direction:
        clip = make_clip(rng, frames=8, size=SIZE)
    path.write_bytes(encode_mp4(clip.frames))
    return path


def predict(capsys, *args: str) -> tuple[int, Any, str]:
    code = mplug(["predict", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


# --- registry, presets, loader ------------------------------------------------------------------


def test_video_presets_take_16_frames_at_224_and_the_tiny_overlay_4():
    for name in VIDEO_TASKS:
        task_cls = task_class(name)
        assert task_cls.video
        preset = load_finetune_config(task_cls)
        assert (preset.data.frames, preset.image_size) == (16, 224)
        assert load_finetune_config(task_cls, "tiny").data.frames == FRAMES


@pytest.mark.parametrize("task_cls, settings, frames", [(VideoQATask, VideoQASettings(), 16),
                                                         (VQATask, VQASettings(), 0)])
def test_the_trainer_reads_clips_of_data_frames_for_a_video_task_only(config, video_tokenizer, task_cls, settings,
                                                                        frames):
    run = load_finetune_config(task_cls)
    trainer = SimpleNamespace(config=dataclasses.replace(config, data=run.data, train=run.train),
                              options=SimpleNamespace(eval_batch_size=0),
                              task=build(task_cls, settings, config, video_tokenizer))
    for train in (True, False):
        assert FinetuneTrainer.loader_config(trainer, train=train).frames == frames


# --- each task trains and evaluates -------------------------------------------------------------


def test_video_qa_ranks_over_the_train_splits_answers_and_scores_exact_match(shards, config, video_tokenizer, tmp_path):
    task = build(VideoQATask, VideoQASettings(rank_k=8), config, video_tokenizer)
    metrics = train_and_evaluate(task, video_tokenizer, shards["video_qa"], tmp_path)
    counts = Counter(m["answers"][0] for b in batches(task, video_tokenizer, shards["video_qa"] / "train", train=False)
                     for m in b["meta"])
    assert task.answer_list == sorted(counts, key=lambda answer: (-counts[answer], answer))  # most frequent first
    assert split_answers(shards["video_qa"] / "train", 2) == task.answer_list[:2]
    assert {"accuracy", "baseline", "count", "accuracy/other", "accuracy/yes/no"} <= set(metrics)
    assert metrics["count"] == 6 * 4  # four questions a clip
    assert 0 < metrics["baseline"] < 100 and 0 <= metrics["accuracy"] <= 100
    answers = {row["answer"] for row in json.loads((tmp_path / "vqa_results.json").read_text())}
    assert answers <= set(task.answer_list)


def test_video_qa_baseline_is_the_exact_match_of_the_most_frequent_answer(config, video_tokenizer, tmp_path):
    task = build(VideoQATask, VideoQASettings(inference="generate"), config, video_tokenizer)
    records = [{"question_id": qid, "answer": answer, "majority": truth, "answer_type": "other"}
               for qid, (answer, truth) in enumerate([("left", "left"), ("Left.", "left"), ("up", "right"),
                                                      ("no", "up")])]
    metrics = task._score(records, tmp_path)
    # "Left." normalises to "left": 2 of 4 right; answering "left" everywhere is right twice too.
    assert metrics["accuracy"] == pytest.approx(50.0) and metrics["baseline"] == pytest.approx(50.0)


def test_video_caption_prompts_a_video_of_and_scores_cider_against_a_constant_caption(
    shards, config, video_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(caption_module, "caption_scores", cider_only)  # pycocoevalcap's Java takes ~45 s
    task = build(VideoCaptionTask, VideoCaptionSettings(beams=2, min_length=2, max_length=8), config, video_tokenizer)
    assert task.settings.prompt == "a video of "
    metrics = train_and_evaluate(task, video_tokenizer, shards["video_caption"], tmp_path)
    assert set(metrics) == {"CIDEr", "baseline", "count"}
    assert metrics["count"] == 6 and metrics["baseline"] > 0 and metrics["CIDEr"] >= 0
    results = json.loads((tmp_path / "caption_results.json").read_text())
    assert sorted(row["image_id"] for row in results) == sorted(
        m["image_id"] for b in batches(task, video_tokenizer, shards["video_caption"] / "val", train=False)
        for m in b["meta"])


def test_a_video_without_an_image_id_is_named_by_its_video_id():
    batch = {"meta": [{"video_id": "video7", "captions": ["a"]}, {"video_id": "video8", "image_id": 8}]}
    assert [m["image_id"] for m in with_image_ids(batch)["meta"]] == ["video7", 8]


def test_video_retrieval_reports_text_to_video_recall_against_random_ranking(shards, config, video_tokenizer, tmp_path):
    task = build(VideoRetrievalTask, RetrievalSettings(k_test=4), config, video_tokenizer, momentum=True)
    metrics = train_and_evaluate(task, video_tokenizer, shards["video_retrieval"], tmp_path)
    assert task.metric == "t2v_r1"
    assert metrics["t2v_r1"] == metrics["img_r1"] and metrics["v2t_r5"] == metrics["txt_r5"]
    assert metrics["baseline"] == pytest.approx(100 / 6)  # one right video of 6
    assert all(0 <= metrics[f"{d}_r{k}"] <= 100 for d in ("t2v", "v2t") for k in (1, 5, 10))
    assert json.loads((tmp_path / "retrieval_scores.json").read_text())["metrics"] == metrics


def test_action_classification_learns_its_classes_from_labels_json_and_reports_top1_top5(
    shards, config, video_tokenizer, tmp_path
):
    task = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    metrics = train_and_evaluate(task, video_tokenizer, shards["action_classification"], tmp_path)
    assert task.settings.num_classes == len(DIRECTIONS) and task.label_names == list(DIRECTIONS)
    assert {"top1", "top5", "baseline", "baseline_top5", "count"} <= set(metrics)
    assert metrics["top5"] == 100.0 == metrics["baseline_top5"]  # 4 classes: every label is in the top 5
    labels = [m["label"] for b in batches(task, video_tokenizer, shards["action_classification"] / "val", train=False)
              for m in b["meta"]]
    assert metrics["baseline"] == pytest.approx(100 * max(labels.count(c) for c in set(labels)) / len(labels))


def test_action_classification_reads_the_class_of_a_flipped_clip_from_its_mirrored_label_name(config, video_tokenizer):
    task = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    task.set_label_names(DIRECTIONS)
    batch = {"images": torch.zeros(2, 1), "keys": ["a", "b"],
             "meta": [{"label": 0, "label_name": "right"}, {"label": 3}]}  # clip a: "left", flipped
    assert task.labels(batch).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"integer label in \[0, 4\)"):
        task.labels({**batch, "meta": [{"label": 7}, {"label": 0}]})


def test_action_classification_without_a_class_count_is_an_error(config, video_tokenizer, tmp_path):
    task = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    with pytest.raises(FileNotFoundError, match="set task.num_classes, or put labels.json"):
        task.prepare_data(tmp_path, "train")


# --- the task package and mplug predict ------------------------------------------------------------


def test_the_action_head_and_class_names_travel_in_the_package(config, video_tokenizer, tmp_path):
    task = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    task.set_label_names(DIRECTIONS)
    package = export_task(task, config, video_tokenizer, tmp_path / "package")
    assert (package / TASK_WEIGHTS_FILE).is_file()
    loaded = load_task_package(package)
    assert loaded.label_names == list(DIRECTIONS)
    torch.testing.assert_close(loaded.head.weight, task.head.weight)
    torch.testing.assert_close(loaded.head.bias, task.head.bias)


def test_fine_tuning_on_from_an_action_package_takes_its_head_and_from_another_package_a_new_one(
    shards, config, video_tokenizer, tmp_path
):
    trained = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    trained.set_label_names(DIRECTIONS)
    package = export_task(trained, config, video_tokenizer, tmp_path / "package")
    pretrained = export_state_dict(tmp_path / "pretrained", trained.model.state_dict(), config, video_tokenizer)
    for init, continued in ((package, True), (pretrained, False)):
        torch.manual_seed(1)
        task = ActionClassificationTask(build_mplug(config.model, momentum=False), ActionSettings(), video_tokenizer)
        task.prepare_data(shards["action_classification"], "train")  # a new head, as FinetuneTrainer builds it
        assert task.continue_from(init) is continued
        assert torch.equal(task.head.weight, trained.head.weight) is continued


def test_predict_names_the_top_classes_of_a_clip(config, video_tokenizer, tmp_path, capsys):
    task = build(ActionClassificationTask, ActionSettings(), config, video_tokenizer)
    task.set_label_names(DIRECTIONS)
    package = export_task(task, config, video_tokenizer, tmp_path / "package")
    code, result, err = predict(capsys, "--model", str(package), "--video", str(a_clip(tmp_path / "clip.mp4")),
                                "--task", "classify")
    assert code == 0, err
    assert sorted(row["label"] for row in result["top"]) == sorted(DIRECTIONS)  # 4 classes: all of them
    probabilities = [row["probability"] for row in result["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=1e-4)


def test_predict_answers_captions_and_scores_texts_for_a_clip(shards, config, video_tokenizer, tmp_path, capsys):
    clip = str(a_clip(tmp_path / "clip.mp4"))
    qa = build(VideoQATask, VideoQASettings(rank_k=4), config, video_tokenizer)
    qa.prepare_data(shards["video_qa"], "train")
    code, result, err = predict(capsys, "--model", str(export_task(qa, config, video_tokenizer, tmp_path / "qa")),
                                "--video", clip, "--question", "which way does the red circle move?")
    assert code == 0, err
    assert result["answer"] in qa.answer_list  # ranked over the train answers shipped in the package

    caption = build(VideoCaptionTask, VideoCaptionSettings(beams=2, min_length=2, max_length=6), config,
                    video_tokenizer)
    code, result, err = predict(capsys, "--model", str(export_task(caption, config, video_tokenizer,
                                                                     tmp_path / "caption")),
                                "--video", clip, "--task", "caption")
    assert code == 0, err
    assert isinstance(result["caption"], str) and "[" not in result["caption"]

    retrieval = build(VideoRetrievalTask, RetrievalSettings(), config, video_tokenizer, momentum=True)
    texts = ["a red circle moves to the left", "a blue square moves up"]
    code, result, err = predict(capsys, "--model", str(export_task(retrieval, config, video_tokenizer,
                                                                     tmp_path / "retrieval")),
                                "--video", clip, "--text", texts[0], "--text", texts[1])
    assert code == 0, err
    assert sorted(row["text"] for row in result["texts"]) == sorted(texts)
    assert result["texts"][0]["match"] >= result["texts"][1]["match"]


def test_predict_refuses_a_file_that_is_not_a_video(config, video_tokenizer, tmp_path, capsys):
    task = build(VideoCaptionTask, VideoCaptionSettings(), config, video_tokenizer)
    package = export_task(task, config, video_tokenizer, tmp_path / "package")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    code, _, err = predict(capsys, "--model", str(package), "--video", str(corrupt), "--task", "caption")
    assert code == 2
    assert f"{corrupt} is not a decodable video" in err


def test_predict_refuses_a_video_for_an_image_model_and_an_image_for_a_video_model(
    config, video_tokenizer, tmp_path, capsys
):
    from finetune.tasks.caption import CaptionSettings, CaptionTask

    image_package = export_task(build(CaptionTask, CaptionSettings(), config, video_tokenizer), config,
                                video_tokenizer, tmp_path / "image")
    code, _, err = predict(capsys, "--model", str(image_package), "--video", str(a_clip(tmp_path / "c.mp4")),
                           "--task", "caption")
    assert code == 2 and "is an image model (caption), it cannot read the video" in err
    video_package = export_task(build(VideoCaptionTask, VideoCaptionSettings(), config, video_tokenizer), config,
                                video_tokenizer, tmp_path / "video")
    code, _, err = predict(capsys, "--model", str(video_package), "--image", str(tmp_path / "x.jpg"),
                           "--task", "caption")
    assert code == 2 and "is a video model (video_caption); give it a clip with --video FILE" in err


# --- through `mplug finetune` -------------------------------------------------------------------


@pytest.mark.slow
def test_mplug_finetune_action_classification_ships_a_head_that_predict_loads(shards, config, video_tokenizer,
                                                                                tmp_path):
    init = export_state_dict(tmp_path / "init", build_mplug(config.model).state_dict(), config, video_tokenizer)
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("RANK", None)
    finetune = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "finetune", "action_classification", "--init", str(init), "--data",
         str(shards["action_classification"]), "--output", str(output), "--preset", "tiny", "--max-steps", "3",
         "--no-register"], capture_output=True, text=True, timeout=600, env=env)
    assert finetune.returncode == 0, finetune.stdout[-3000:] + finetune.stderr[-5000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["metric"] == "top1" and 0 < metrics["baseline"] < 100
    package = output / "package"
    again = subprocess.run(  # evaluating the fine-tuned package scores its own head, not a new one
        [sys.executable, "-m", "cluster.cli", "finetune", "action_classification", "--init", str(package), "--data",
         str(shards["action_classification"]), "--output", str(tmp_path / "eval"), "--preset", "tiny",
         "--eval-only"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == metrics["metrics"]
    assert json.loads((package / "package.json").read_text())["extra"]["task_settings"]["num_classes"] == 4
    predicted = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "predict", "--model", str(package), "--video",
         str(a_clip(tmp_path / "clip.mp4")), "--task", "classify"], capture_output=True, text=True, timeout=300,
        env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert sorted(row["label"] for row in json.loads(predicted.stdout)["top"]) == sorted(DIRECTIONS)
