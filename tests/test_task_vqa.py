"""The VQA task: the weighted generative answer loss, generation and ranking, the VQA accuracy,
its majority-answer baseline, the results file and the checks on samples and answer lists."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from data_prep.batch import normalize, tokenize
from data_prep.loader import LoaderConfig, ShardLoader
from finetune.metrics.vqa_accuracy import answer_accuracy
from finetune.tasks.base import EvalContext
from finetune.tasks.vqa import VQASettings, VQATask, majority_answer
from pretrain.models.factory import build_mplug

IMAGE_SIZE = 64  # the tiny preset's resolution
EVAL_BATCH = 16
TRAIN_BATCH = 16
LEARNING_RATE = 1e-3
LEARN_SCENES = 300  # synthetic scenes of the learnability check: 1,200 train and 300 val questions
LEARN_STEPS = 600
LEARN_SHUFFLE = 256
LOSS_STEPS = 40
TRAINED_MODULES = ("vision", "text_encoder", "fusion", "decoder")
UNUSED_MODULES = ("itm_head", "vision_proj", "text_proj", "mlm_head", "temp")


@pytest.fixture
def make_task(tiny_config, tokenizer):
    def build(**settings: Any) -> VQATask:
        torch.manual_seed(0)
        model = build_mplug(tiny_config().model, momentum=False)
        return VQATask(model, VQASettings(**settings), tokenizer)

    return build


def model_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "images": normalize(batch["images"])}


def split_batches(task: VQATask, tokenizer, split: Path, batch_size: int = EVAL_BATCH) -> Iterator[dict[str, Any]]:
    """One exact pass over a split, as the trainer's evaluation loader reads it."""
    config = LoaderConfig(batch_size=batch_size, image_size=IMAGE_SIZE, mode="epoch", workers=0,
                          **task.loader_fields(train=False))
    return (model_batch(b) for b in ShardLoader(str(split), config, tokenizer=tokenizer))


def hand_batch(tokenizer, meta: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of random images for hand-written questions and answers."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(meta), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    questions = [m["question"] for m in meta]
    return {"images": normalize(images), **tokenize(tokenizer, questions, VQASettings.max_question_length),
            "texts": questions, "meta": meta, "keys": [str(m["question_id"]) for m in meta]}


def question(qid: int, answers: dict[str, int], answer_type: str = "yes/no") -> dict[str, Any]:
    """A sample's meta with `answers` {answer: annotators}, most frequent first, as the converter writes it."""
    unique = sorted(answers, key=lambda a: -answers[a])
    total = sum(answers.values())
    return {"question_id": qid, "question": "Is there a red circle?", "answers": unique,
            "weights": [answers[a] / total for a in unique],
            "annotator_answers": [a for a in unique for _ in range(answers[a])], "answer_type": answer_type}


def results(output: Path) -> list[dict[str, Any]]:
    return json.loads((output / "vqa_results.json").read_text())


# --- training loss --------------------------------------------------------------------------------


def test_loader_reads_the_question_as_the_text(make_task):
    fields = make_task().loader_fields(train=True)
    assert fields["text_field"] == "question"
    assert fields["max_text_length"] == VQASettings.max_question_length
    assert fields["augment"] == "finetune"


def test_loss_is_finite_and_reaches_every_module_on_the_answer_path_only(make_task, tokenizer):
    task = make_task()
    batch = hand_batch(tokenizer, [question(1, {"yes": 7, "no": 3}), question(2, {"2": 10}, "number")])
    out = task(batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    for name in TRAINED_MODULES:
        grads = [p.grad for p in getattr(task.model, name).parameters()]
        assert all(g is not None for g in grads), f"{name} has parameters without a gradient"
        assert sum(g.abs().sum().item() for g in grads) > 0, f"{name} gets a zero gradient"
    trained = {id(p) for name in TRAINED_MODULES for p in getattr(task.model, name).parameters()}
    for name in UNUSED_MODULES:  # the MLM head's output matrix is the text encoder's embedding: skipped
        module = getattr(task.model, name)
        params = [module] if isinstance(module, torch.nn.Parameter) else list(module.parameters())
        own = [p for p in params if id(p) not in trained]
        assert own and all(p.grad is None for p in own), f"{name} is not on the VQA path but got a gradient"


def test_loss_sums_each_answer_times_its_weight_and_divides_by_questions(make_task, tokenizer):
    task = make_task().eval()
    meta = [question(1, {"yes": 7, "no": 3}), question(2, {"blue": 10}, "other")]
    batch = hand_batch(tokenizer, meta)
    memory, memory_mask = task.memory(batch)
    expected = torch.zeros(())
    for row, sample in enumerate(meta):
        for answer, weight in zip(sample["answers"], sample["weights"], strict=True):
            ids = torch.tensor([tokenizer(answer)["input_ids"]])  # (1, L) [CLS] answer [SEP], no prompt
            assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
            logits = task.model.decode(ids, torch.ones_like(ids), memory[row:row + 1], memory_mask[row:row + 1])
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")  # summed over the answer's tokens
            expected = expected + weight * nll
    loss = task(batch).loss
    torch.testing.assert_close(loss, expected / len(meta))


@pytest.mark.parametrize("broken, complaint", [
    ({"answers": [], "weights": []}, "has no answers"),
    ({"weights": [1.0]}, "2 answers but weights=[1.0]"),
])
def test_a_malformed_sample_is_an_error_naming_its_key(make_task, tokenizer, broken, complaint):
    batch = hand_batch(tokenizer, [question(1, {"yes": 10}), {**question(7, {"yes": 5, "no": 5}), **broken}])
    with pytest.raises(ValueError, match=re.escape(complaint)) as error:
        make_task()(batch)
    assert "'7'" in str(error.value)


def test_training_loss_falls(make_task, tokenizer, task_shards):
    task = make_task()
    batches = list(itertools.islice(split_batches(task, tokenizer, task_shards.vqa / "train", TRAIN_BATCH), 2))
    optimizer = torch.optim.AdamW(task.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(LOSS_STEPS):
        loss = task(batches[step % len(batches)], step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-len(batches):]) < 0.5 * sum(losses[:len(batches)])


# --- evaluation -----------------------------------------------------------------------------------


def val_meta(task_shards) -> list[dict[str, Any]]:
    config = LoaderConfig(batch_size=EVAL_BATCH, image_size=IMAGE_SIZE, mode="epoch", workers=0)
    return [m for batch in ShardLoader(str(task_shards.vqa / "val"), config) for m in batch["meta"]]


def test_generate_mode_scores_every_val_question_and_writes_the_challenge_file(make_task, tokenizer, task_shards,
                                                                               tmp_path):
    task = make_task()
    metrics = task.evaluate(split_batches(task, tokenizer, task_shards.vqa / "val"), EvalContext(tmp_path))
    meta = val_meta(task_shards)
    assert metrics["count"] == len(meta) > 0
    types = {m["answer_type"] for m in meta}
    assert set(metrics) == {"accuracy", "baseline", "count", *(f"accuracy/{t}" for t in types)}
    assert all(0.0 <= metrics[key] <= 100.0 for key in metrics if key != "count")
    rows = results(tmp_path)
    assert sorted(r["question_id"] for r in rows) == sorted(m["question_id"] for m in meta)
    assert all(isinstance(r["answer"], str) and "[" not in r["answer"] for r in rows)  # no [SEP]/[PAD] left
    annotated = {m["question_id"]: m["annotator_answers"] for m in meta}
    accuracy = 100.0 * sum(answer_accuracy(r["answer"], annotated[r["question_id"]]) for r in rows) / len(rows)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert task.training  # evaluation leaves the train/eval mode as it found it


def test_rank_mode_answers_from_the_answer_list(make_task, tokenizer, task_shards, tmp_path):
    task = make_task(inference="rank", answer_list=str(task_shards.answer_list))
    metrics = task.evaluate(split_batches(task, tokenizer, task_shards.vqa / "val"), EvalContext(tmp_path))
    assert metrics["count"] == len(val_meta(task_shards))
    candidates = set(json.loads(task_shards.answer_list.read_text()))
    assert {r["answer"] for r in results(tmp_path)} <= candidates


def test_baseline_is_the_accuracy_of_always_giving_the_most_frequent_majority_answer(make_task, tokenizer, tmp_path):
    # Majority answers yes, yes, no: the constant answer is "yes". It scores 1 where 10 and where 6
    # annotators said yes, and 0.6 where 2 did (8 left-out "no"s leave 2 matches: 2/3; 2 left-out
    # "yes"es leave 1: 1/3; (8 * 2/3 + 2 * 1/3) / 10 = 0.6).
    meta = [question(1, {"yes": 10}), question(2, {"yes": 6, "no": 4}), question(3, {"no": 8, "yes": 2})]
    metrics = make_task().evaluate([hand_batch(tokenizer, meta)], EvalContext(tmp_path))
    assert metrics["baseline"] == pytest.approx(100.0 * (1 + 1 + 0.6) / 3)
    assert metrics["count"] == 3


def test_majority_answer_ties_go_to_the_answer_that_sorts_first():
    assert majority_answer(["yes", "no", "yes", "2", "no"]) == "no"
    assert majority_answer(["2", "yes", "yes"]) == "yes"


def test_rank_mode_without_an_answer_list_is_an_error():
    with pytest.raises(ValueError, match="answer_list is not set"):
        VQASettings(inference="rank")


def test_an_answer_list_that_is_not_a_list_of_strings_is_an_error(make_task, tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"yes": 0, "no": 1}))
    with pytest.raises(ValueError, match="holds a dict; expected a non-empty JSON list of answer strings"):
        make_task(inference="rank", answer_list=str(table))


def test_an_answer_list_without_any_annotated_answer_is_an_error(make_task, tokenizer, task_shards, tmp_path):
    wrong = tmp_path / "animals.json"
    wrong.write_text(json.dumps(["elephant", "giraffe"]))
    task = make_task(inference="rank", answer_list=str(wrong))
    batches = itertools.islice(split_batches(task, tokenizer, task_shards.vqa / "val"), 1)
    with pytest.raises(ValueError, match="contains none of the answers annotated") as error:
        task.evaluate(batches, EvalContext(tmp_path / "out"))
    assert "'elephant'" in str(error.value) and ("'yes'" in str(error.value) or "'no'" in str(error.value))
    assert not (tmp_path / "out" / "vqa_results.json").exists()


def test_an_answer_list_missing_some_majority_answers_warns_with_their_share(make_task, tokenizer, task_shards,
                                                                              tmp_path, caplog):
    short = tmp_path / "no_yes.json"
    short.write_text(json.dumps([a for a in json.loads(task_shards.answer_list.read_text()) if a != "yes"]))
    task = make_task(inference="rank", answer_list=str(short))
    meta = val_meta(task_shards)
    share = sum(m["answers"][0] == "yes" for m in meta) / len(meta)
    with caplog.at_level(logging.WARNING, logger="finetune.tasks.vqa"):
        task.evaluate(split_batches(task, tokenizer, task_shards.vqa / "val"), EvalContext(tmp_path))
    assert f"{100 * share:.1f}% of the {len(meta)} evaluated questions ('yes')" in caplog.text


def test_a_split_without_annotations_is_an_error_after_writing_the_predictions(make_task, tokenizer, tmp_path):
    unanswered = {**question(5, {"yes": 10}), "answers": [], "weights": [], "annotator_answers": []}
    with pytest.raises(ValueError, match="no annotator answers"):
        make_task().evaluate([hand_batch(tokenizer, [unanswered])], EvalContext(tmp_path))
    assert [r["question_id"] for r in results(tmp_path)] == [5]


# --- learnability ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_model_trained_from_scratch_beats_twice_the_majority_baseline(make_task, tokenizer, tmp_path):
    # The shared fixture's 60 questions of val sit too close to 2x (37.7 to 45.2 over tokenizer and
    # init draws after 300 steps); 300 scenes and 600 steps gave 44.2 to 47.0 against 19.0 (5 runs).
    from data_prep.synthetic_task_shards import write_task_shards

    shards = write_task_shards(tmp_path / "shards", scenes=LEARN_SCENES)
    task = make_task()
    config = LoaderConfig(batch_size=TRAIN_BATCH, image_size=IMAGE_SIZE, workers=0, shuffle_buffer=LEARN_SHUFFLE,
                          **{**task.loader_fields(train=True), "augment": "eval"})
    loader = ShardLoader(str(shards.vqa / "train"), config, tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(task.parameters(), lr=LEARNING_RATE)
    for step, batch in zip(range(LEARN_STEPS), loader, strict=False):
        loss = task(model_batch(batch), step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = task.evaluate(split_batches(task, tokenizer, shards.vqa / "val"), EvalContext(tmp_path / "eval"))
    assert metrics["accuracy"] >= 2 * metrics["baseline"] > 0
