"""The caption task: prompted decoder layout, cross-entropy and SCST losses, evaluation and baseline.

The tests that run pycocoevalcap (Java: PTB tokenizer and METEOR, about 25 s per scoring on a
2-core machine) are marked slow. The fast ones that need scores swap `caption_scores` for
`cider_only`, a pure-Python CIDEr-D over the same references: on captions without punctuation
subtleties the two agree (see finetune/metrics/cider_d.py), and the slow tests check that they do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune.tasks.caption as caption_module
from data_prep.batch import normalize, tokenize
from data_prep.loader import LoaderConfig, ShardLoader
from finetune.metrics.cider_d import CiderD
from finetune.tasks.base import EvalContext
from finetune.tasks.caption import (
    CaptionSettings,
    CaptionTask,
    caption_labels,
    most_common_caption,
    normalize_caption,
    scst_loss,
)
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.models.factory import build_mplug
from pretrain.objectives.mlm import IGNORE

IMAGE_SIZE = 64  # the tiny preset's
BATCH = 8
CAPTION_KEYS = {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
CIDER_D_MAX = 10.0  # a caption identical to every reference
FAST = {"beams": 2, "min_length": 0, "max_length": 8}  # short decoding for the tests that only need a caption


def build_task(tokenizer, seed: int = 0, **settings: Any) -> CaptionTask:
    torch.manual_seed(seed)
    config = with_tokenizer(load_config("tiny", []), tokenizer)
    return CaptionTask(build_mplug(config.model, momentum=False), CaptionSettings(**settings), tokenizer)


def loader(split_dir: Path, tokenizer, task: CaptionTask, *, train: bool, batch_size: int = BATCH) -> ShardLoader:
    mode = "resampled" if train else "epoch"
    fields = {**task.loader_fields(train), "randaugment": False} if train else task.loader_fields(train)
    config = LoaderConfig(batch_size=batch_size, image_size=IMAGE_SIZE, mode=mode, workers=0, **fields)
    return ShardLoader(str(split_dir), config, tokenizer=tokenizer, rank=0, world_size=1)


def on_device(batches) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield {**batch, "images": normalize(batch["images"])}


def first_batch(split_dir: Path, tokenizer, task: CaptionTask) -> dict[str, Any]:
    return next(on_device(loader(split_dir, tokenizer, task, train=True)))


def cider_only(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], **_: Any) -> dict[str, float]:
    """Stand-in for caption_scores without Java: CIDEr-D with document frequencies over the scored images."""
    ids = list(predictions)
    scores = CiderD([references[i] for i in ids]).score([predictions[i] for i in ids], [references[i] for i in ids])
    return {"CIDEr": float(scores.mean())}


# ---- the decoder layout: [CLS] prompt caption [SEP], the prompt without loss ----


def test_caption_labels_are_the_next_token_and_ignore_the_end_and_padding():
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert caption_labels(ids, mask).tolist() == [[10, 11, 3, IGNORE], [12, 3, IGNORE, IGNORE]]


def test_prompted_decode_reads_the_prompt_after_bos(tokenizer):
    task = build_task(tokenizer).eval()
    caption = tokenize(tokenizer, ["red circle left of blue square"], 24)
    explicit = tokenize(tokenizer, ["a picture of red circle left of blue square"], 24)
    prompt_length = task.prompt_ids.numel()
    assert tokenizer.convert_ids_to_tokens(task.prompt_ids.tolist()) == ["a", "picture", "of"]
    memory = torch.randn(1, 5, task.model.cfg.text.width)
    memory_mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        prompted = task.prompted_decode(caption["input_ids"], caption["attention_mask"], memory, memory_mask)
        full = task.model.decode(explicit["input_ids"], explicit["attention_mask"], memory, memory_mask)
    # The BOS of the prompted call stands where the explicit sequence has its last prompt word.
    assert prompted.shape[1] == caption["input_ids"].shape[1]
    torch.testing.assert_close(prompted, full[:, prompt_length:], rtol=1e-5, atol=1e-5)


def test_loss_is_the_cross_entropy_of_the_caption_tokens_only(tokenizer, task_shards):
    task = build_task(tokenizer)
    batch = first_batch(task_shards.caption / "train", tokenizer, task)
    loss = task(batch).loss
    # The same loss from the explicit layout: "[CLS] a picture of caption [SEP]", prompt labels IGNORE.
    explicit = tokenize(tokenizer, ["a picture of " + text for text in batch["texts"]], 64)
    ids, mask = explicit["input_ids"], explicit["attention_mask"]
    labels = caption_labels(ids, mask)
    labels[:, : task.prompt_ids.numel()] = IGNORE  # positions 0..P-1 predict the prompt words
    memory = task.model.encode_image(batch["images"])
    logits = task.model.decode(ids, mask, memory, torch.ones(memory.shape[:2], dtype=torch.long))
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_loss_is_finite_and_reaches_the_vision_encoder_and_decoder_only(tokenizer, task_shards):
    task = build_task(tokenizer)
    batch = first_batch(task_shards.caption / "train", tokenizer, task)
    out = task(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    model = task.model
    for used in (model.vision, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in used.parameters())
    for unused in (model.text_encoder, model.fusion, model.itm_head):
        assert all(p.grad is None for p in unused.parameters())


def test_label_smoothing_applies_to_the_caption_cross_entropy(tokenizer, task_shards):
    plain = build_task(tokenizer)
    smoothed = build_task(tokenizer, label_smoothing=0.1)
    batch = first_batch(task_shards.caption / "train", tokenizer, plain)
    memory = plain.model.encode_image(batch["images"])
    logits = plain.prompted_decode(batch["input_ids"], batch["attention_mask"], memory,
                                   torch.ones(memory.shape[:2], dtype=torch.long))
    labels = caption_labels(batch["input_ids"], batch["attention_mask"])
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(smoothed(batch).loss, expected, rtol=1e-5, atol=1e-5)
    assert smoothed(batch).loss.item() != pytest.approx(plain(batch).loss.item())


# ---- SCST ----


def test_scst_loss_weighs_each_log_prob_by_its_reward_above_the_image_mean():
    log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # image 1: baseline 2, advantages -1, +1; image 2: all 0
    # -mean(-1 * -1, +1 * -2, 0, 0) = -(1 - 2) / 4
    assert scst_loss(log_probs, rewards, samples=2).item() == pytest.approx(0.25)


def test_scst_loss_rejects_a_batch_not_divisible_by_the_samples():
    with pytest.raises(ValueError, match="samples=2"):
        scst_loss(torch.zeros(3), torch.zeros(3), samples=2)


def test_scst_forward_back_propagates_the_sampled_log_probs(tokenizer, task_shards):
    task = build_task(tokenizer, scst=True, scst_samples=3, scst_max_length=6)
    batch = first_batch(task_shards.caption / "train", tokenizer, task)
    out = task(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert set(out.losses) == {"scst", "reward"}
    assert 0.0 <= out.losses["reward"].item() <= CIDER_D_MAX
    for used in (task.model.vision, task.model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in used.parameters())


def test_rewards_take_document_frequencies_from_the_batch_until_a_corpus_is_set(tokenizer):
    task = build_task(tokenizer)
    references = [["a red circle", "one red circle"], ["a blue square", "a blue square alone"]]
    captions = ["a red circle", "a red square"]
    corpus = references + [["a red circle left of a blue square"], ["a red square"], ["a green triangle"]]
    from_batch = CiderD(references).score(captions, references)
    from_corpus = CiderD(corpus).score(captions, references)
    assert not np.allclose(from_batch, from_corpus)  # the choice matters for this corpus
    np.testing.assert_allclose(task.rewards(captions, references), from_batch)
    task.set_reference_corpus(corpus)
    np.testing.assert_allclose(task.rewards(captions, references), from_corpus)


# ---- settings ----


def test_settings_defaults_follow_the_reference_recipe():
    settings = CaptionSettings()
    assert (settings.prompt, settings.beams, settings.min_length, settings.max_length) == ("a picture of ", 5, 8, 25)
    assert (settings.scst, settings.scst_samples, settings.label_smoothing) == (False, 5, 0.0)


def test_a_single_scst_sample_is_refused(tokenizer):
    with pytest.raises(ValueError, match="scst_samples must be >= 2.*got 1"):
        build_task(tokenizer, scst_samples=1)


def test_lengths_beyond_the_decoder_positions_are_refused(tokenizer):
    # tiny: 64 positions; BOS + 3 prompt tokens + 61 > 64
    with pytest.raises(ValueError, match="65 positions exceed the decoder's max_positions 64"):
        build_task(tokenizer, max_length=61)


# ---- evaluation and baseline ----


def test_most_common_caption_compares_normalised_text_and_keeps_the_first_of_a_tie():
    references = [["A dog.", "a cat"], ["a DOG", "A cat."], ["a bird", "a bird"]]
    assert normalize_caption("  A  dog's toy. ") == "a dogs toy"
    assert most_common_caption(references) == "a dog"  # dog, cat and bird twice each: dog came first


def hand_batch(task: CaptionTask, references: list[list[str]]) -> dict[str, Any]:
    images = torch.randn(len(references), 3, IMAGE_SIZE, IMAGE_SIZE)
    meta = [{"image_id": index + 1, "captions": refs} for index, refs in enumerate(references)]
    return {"images": images, "meta": meta}


def test_baseline_is_the_cider_of_the_most_common_reference_by_hand(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(caption_module, "caption_scores", cider_only)
    task = build_task(tokenizer, **FAST)
    # "red circle" (twice, first seen) is every image's caption. Image 1: identical to both its
    # references, so the 1- and 2-gram cosines are 1 and there are no 3- or 4-grams: 10 * (1 + 1) / 4
    # = 5. Image 2 shares no word: 0. Their mean: 2.5.
    references = [["red circle", "Red circle."], ["blue square", "a blue square"]]
    metrics = task.evaluate([hand_batch(task, references)], EvalContext(tmp_path))
    assert metrics["baseline"] == pytest.approx(2.5)
    assert metrics["count"] == 2


def test_evaluate_counts_each_image_and_writes_coco_results(tokenizer, task_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(caption_module, "caption_scores", cider_only)
    task = build_task(tokenizer, **FAST)
    val = task_shards.caption / "val"
    image_ids = [m["image_id"] for b in loader(val, tokenizer, task, train=False) for m in b["meta"]]
    metrics = task.evaluate(on_device(loader(val, tokenizer, task, train=False)), EvalContext(tmp_path))
    assert metrics["count"] == len(image_ids) == len(set(image_ids))
    results = json.loads((tmp_path / "caption_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(image_ids)
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)


def test_evaluate_restores_training_mode(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(caption_module, "caption_scores", cider_only)
    task = build_task(tokenizer, **FAST).train()
    task.evaluate([hand_batch(task, [["red circle"]])], EvalContext(tmp_path))
    assert task.training


def test_training_loss_falls(tokenizer, task_shards):
    task = build_task(tokenizer)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    batches = on_device(loader(task_shards.caption / "train", tokenizer, task, train=True))
    losses = []
    for _, batch in zip(range(60), batches, strict=False):
        loss = task(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


@pytest.mark.slow  # pycocoevalcap twice: about 50 s
def test_evaluate_over_an_epoch_returns_every_caption_metric_in_range(tokenizer, task_shards, tmp_path):
    task = build_task(tokenizer)  # the reference decoding: 5 beams, 8 to 25 tokens
    val = task_shards.caption / "val"
    metas = [m for b in loader(val, tokenizer, task, train=False) for m in b["meta"]]
    metrics = task.evaluate(on_device(loader(val, tokenizer, task, train=False)), EvalContext(tmp_path))
    assert set(metrics) == CAPTION_KEYS | {"baseline", "count"}
    assert metrics["count"] == len(metas)
    for key in CAPTION_KEYS - {"CIDEr"}:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert 0.0 <= metrics["CIDEr"] <= CIDER_D_MAX
    # pycocoevalcap's CIDEr of the constant caption equals the pure-Python CIDEr-D on these captions;
    # ties between equally frequent references go to the first in image-id order
    references = [m["captions"] for m in sorted(metas, key=lambda m: m["image_id"])]
    constant = most_common_caption(references)
    assert metrics["baseline"] == pytest.approx(float(CiderD(references).score([constant] * len(metas), references).mean()))


LEARN_SCENES = 300  # 240 training images: the 48 of the shared fixture are too few to generalise from
LEARN_STEPS = 500


@pytest.mark.slow  # about 60 s of training and 50 s of pycocoevalcap
def test_a_tiny_model_learns_to_beat_the_constant_caption_twice_over(tokenizer, tmp_path):
    from data_prep.synthetic_task_shards import write_task_shards

    shards = write_task_shards(tmp_path / "shards", scenes=LEARN_SCENES)
    task = build_task(tokenizer, min_length=0)  # synthetic captions run 3 to 20 words
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    batches = on_device(loader(shards.caption / "train", tokenizer, task, train=True))
    for _, batch in zip(range(LEARN_STEPS), batches, strict=False):
        loss = task(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()
    val = on_device(loader(shards.caption / "val", tokenizer, task, train=False))
    metrics = task.evaluate(val, EvalContext(tmp_path / "eval"))
    assert metrics["CIDEr"] >= 2 * metrics["baseline"] > 0, metrics

