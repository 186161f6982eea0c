"""Visual grounding: bin tokens in the decoder, the error-weighted box loss, evaluation and its baseline."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from data_prep.batch import normalize
from data_prep.loader import LoaderConfig, ShardLoader
from finetune.metrics.boxes import quantize_box
from finetune.tasks.base import EvalContext
from finetune.tasks.grounding import (
    RESULTS_FILE,
    GroundingSettings,
    GroundingTask,
    box_loss,
    centred_box_baseline,
    tokens_to_boxes,
)
from pretrain.models.factory import build_mplug

IMAGE_SIZE = 64  # the tiny preset's input and the synthetic images' size
BINS = IMAGE_SIZE + 1
BATCH = 8
MAX_TEXT = 24
EVAL_SPLITS = ("val", "testA", "testB")  # together, so that accuracy is measured on ~50 expressions


def make_task(tiny_config, tokenizer, **settings: Any) -> GroundingTask:
    torch.manual_seed(0)
    model = build_mplug(tiny_config().model, momentum=False)
    return GroundingTask(model, GroundingSettings(**settings), tokenizer)


def loader(task: GroundingTask, tokenizer, data: str | list[str], *, train: bool,
           image_size: int = IMAGE_SIZE) -> ShardLoader:
    config = LoaderConfig(batch_size=BATCH, image_size=image_size, mode="resampled" if train else "epoch",
                          workers=0, shuffle_buffer=64 if train else 0, max_text_length=MAX_TEXT,
                          **task.loader_fields(train))
    return ShardLoader(data, config, tokenizer=tokenizer, rank=0, world_size=1)


def on_device(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "images": normalize(batch["images"])}


def manifest_count(split_dir: Path) -> int:
    return json.loads((split_dir / "manifest.json").read_text())["count"]


# ---------------------------------------------------------------------------------------------
# Bin tokens


def test_bin_tokens_grow_the_decoder_vocabulary_and_keep_the_lm_head_tied(tiny_config, tokenizer):
    torch.manual_seed(0)
    model = build_mplug(tiny_config().model, momentum=False)
    vocab = model.cfg.text.vocab_size
    old_rows = model.decoder.embeddings.word_embeddings.weight.detach().clone()
    old_bias = model.decoder.lm_head.head.predictions.decoder.bias.detach().clone()
    task = GroundingTask(model, GroundingSettings(), tokenizer)

    embedding = model.decoder.embeddings.word_embeddings
    predictions = model.decoder.lm_head.head.predictions
    assert embedding.weight.shape == (vocab + BINS, model.cfg.text.width)
    assert torch.equal(embedding.weight[:vocab], old_rows)
    assert predictions.decoder.weight is embedding.weight
    assert predictions.bias is predictions.decoder.bias
    assert torch.equal(predictions.bias[:vocab], old_bias)
    assert torch.equal(predictions.bias[vocab:], torch.zeros(BINS))
    assert 0.01 < embedding.weight[vocab:].std().item() < 0.03  # BERT's N(0, 0.02)
    assert model.text_encoder.embeddings.word_embeddings.num_embeddings == vocab
    assert task.bin_ids.tolist() == list(range(vocab, vocab + BINS))


def test_a_model_that_already_has_the_bin_tokens_is_not_grown_again(tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer)
    again = GroundingTask(task.model, GroundingSettings(), tokenizer)
    assert again.model.decoder.embeddings.word_embeddings.num_embeddings == task.first_bin + BINS


def test_a_decoder_of_another_size_is_refused(tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer)
    task.model.cfg.vision.image_size = IMAGE_SIZE * 2  # would need 129 bins on top of the text vocabulary
    with pytest.raises(ValueError, match="token rows"):
        GroundingTask(task.model, GroundingSettings(), tokenizer)


# ---------------------------------------------------------------------------------------------
# Data


def test_training_loader_resizes_without_crop_and_flips_boxes_with_the_image(task_shards, tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer)
    fields = task.loader_fields(train=True)
    augment = LoaderConfig(batch_size=1, image_size=IMAGE_SIZE, **fields).augment_config()
    assert (augment.crop, augment.flip, augment.randaugment) == (False, True, False)

    originals = {}
    for batch in loader(task, tokenizer, str(task_shards.grounding / "train"), train=False):
        originals.update({key: meta["box"] for key, meta in zip(batch["keys"], batch["meta"], strict=True)})
    half = IMAGE_SIZE // 2  # the 64-pixel images are resized to 32: boxes halve
    flips = 0
    training = loader(task, tokenizer, str(task_shards.grounding / "train"), train=True, image_size=half)
    for batch in itertools.islice(training, 4):
        assert batch["images"].shape[-2:] == (half, half)
        for key, meta in zip(batch["keys"], batch["meta"], strict=True):
            x, y, w, h = (v / 2 for v in originals[key])
            mirrored = [half - x - w, y, w, h]
            assert meta["box"] == pytest.approx([x, y, w, h]) or meta["box"] == pytest.approx(mirrored)
            flips += meta["box"] != pytest.approx([x, y, w, h])
    assert flips > 0


# ---------------------------------------------------------------------------------------------
# Loss


def test_box_loss_weights_each_token_by_its_coordinate_error_and_the_box_giou():
    # 3 bins hold 0, 0.5, 1. Every token is sure of bin 1, so the expected box is (0.5, 0.5, 0.5, 0.5):
    # xyxy (0.25, 0.25, 0.75, 0.75) inside the target (0, 0, 1, 1), IoU = GIoU = 0.25.
    logits = torch.full((1, 4, 3), -30.0)
    logits[..., 1] = 30.0
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    parts = box_loss(logits, quantize_box(target, 3), target, l1_weight=1.0, giou_weight=2.0)
    assert parts.l1[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert parts.giou[0].item() == pytest.approx(0.25)
    assert parts.weight[0].tolist() == pytest.approx([2.5, 2.5, 3.0, 3.0])  # 1 + L1 + 2 * (1 - 0.25)
    assert parts.ce[0].tolist() == pytest.approx([0.0, 0.0, 60.0, 60.0], abs=1e-4)
    assert parts.loss.item() == pytest.approx((3.0 * 60.0 * 2) / 4, rel=1e-4)


def test_a_right_and_sure_prediction_has_weight_one_and_no_loss():
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    bins = quantize_box(target, 3)  # (1, 4): 1, 1, 2, 2
    logits = torch.full((1, 4, 3), -30.0).scatter(-1, bins[..., None], 30.0)
    parts = box_loss(logits, bins, target, l1_weight=1.0, giou_weight=1.0)
    assert parts.weight[0].tolist() == pytest.approx([1.0] * 4)
    assert parts.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_finite_and_reaches_vision_text_fusion_and_decoder_only(task_shards, tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer)
    batch = next(iter(loader(task, tokenizer, str(task_shards.grounding / "train"), train=True)))
    out = task(on_device(batch))
    assert out.loss.dim() == 0 and math.isfinite(out.loss.item()) and out.loss.item() > 0
    assert set(out.losses) == {"box_ce", "box_l1", "box_giou", "box_weight"}
    out.loss.backward()

    def has_grad(prefix: str) -> bool:
        grads = [p.grad for n, p in task.model.named_parameters() if n.startswith(prefix)]
        return any(g is not None and g.abs().sum() > 0 for g in grads)

    for used in ("vision.", "text_encoder.", "fusion.", "decoder.layers.", "decoder.lm_head.head.predictions.transform"):
        assert has_grad(used), used
    for unused in ("itm_head.", "vision_proj.", "text_proj.", "temp", "mlm_head.head.predictions.transform"):
        assert not has_grad(unused), unused
    word_grad = task.model.decoder.embeddings.word_embeddings.weight.grad  # (V + bins, D)
    text_rows = word_grad[: task.first_bin].abs().sum(dim=1).nonzero().flatten().tolist()
    assert text_rows == [task.model.cfg.text.cls_id]  # of the text vocabulary, only [CLS] is an input
    assert word_grad[task.first_bin :].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_centred_box_baseline_by_hand():
    # Mean w = h = 0.5: the guess is (0.25, 0.25, 0.5, 0.5). It equals the first box (IoU 1); with the
    # second, (0, 0, 0.5, 0.5), it overlaps 0.25 x 0.25: IoU 0.0625 / 0.4375 = 1/7 < 0.5.
    gt = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    assert centred_box_baseline(gt) == pytest.approx(50.0)
    assert centred_box_baseline(gt, threshold=0.1) == pytest.approx(100.0)


def test_box_tokens_become_pixel_boxes_clipped_to_the_image():
    first = 1000
    tokens = torch.tensor([[32, 32, 16, 16], [0, 64, 32, 16]]) + first  # (cx, cy, w, h) in 64ths
    boxes = tokens_to_boxes(tokens, first, BINS, height=64, width=128)
    assert boxes[0].tolist() == pytest.approx([48.0, 24.0, 80.0, 40.0])  # x scaled by 128, y by 64
    assert boxes[1].tolist() == pytest.approx([0.0, 56.0, 32.0, 64.0])  # clipped at x = 0 and y = 64


def test_evaluate_returns_every_metric_in_range_and_writes_one_record_per_expression(
    task_shards, tiny_config, tokenizer, tmp_path
):
    task = make_task(tiny_config, tokenizer)
    split = task_shards.grounding / "val"
    batches = (on_device(b) for b in loader(task, tokenizer, str(split), train=False))
    metrics = task.evaluate(batches, EvalContext(tmp_path))

    assert set(metrics) == {"accuracy", "mean_iou", "baseline", "count"}
    assert metrics["count"] == manifest_count(split)
    assert 0.0 <= metrics["accuracy"] <= 100.0 and 0.0 <= metrics["baseline"] <= 100.0
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert task.training  # evaluation leaves the mode as it found it
    records = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert len(records) == manifest_count(split)
    assert {"key", "ref_id", "sentence", "box", "gt", "image_size", "iou"} <= set(records[0])
    assert metrics["mean_iou"] == pytest.approx(sum(r["iou"] for r in records) / len(records))
    gt = torch.tensor([r["gt"] for r in records]) / IMAGE_SIZE  # the synthetic images are 64 x 64
    assert metrics["baseline"] == pytest.approx(centred_box_baseline(gt))


def test_evaluate_over_an_empty_split_says_so(tiny_config, tokenizer, tmp_path):
    task = make_task(tiny_config, tokenizer)
    with pytest.raises(ValueError, match="no samples"):
        task.evaluate(iter([]), EvalContext(tmp_path))


# ---------------------------------------------------------------------------------------------
# Training
#
# Learnability from random initialisation is measured outside the suite: the tiny model needs
# ~1,500 steps on ~1,900 expressions to beat the centred box twice over, minutes on this CPU.
# Here: the training loss falls, and what is trained is what evaluation decodes.

LR = 1e-3
FALL_STEPS = 40
FALL_RATIO = 0.8  # the loss of a held batch drops by at least a fifth (0.71 seen here)
MEMORISE_STEPS = 80  # one batch is memorised (100% accuracy) after ~60 steps
MEMORISED_IOU = 0.9  # 65 bins over 64 pixels cost ~0.5 px per edge: IoU ~0.95 at best


def train(task: GroundingTask, batches, steps: int) -> None:
    optimizer = torch.optim.AdamW(task.parameters(), lr=LR, weight_decay=0.0)
    task.train()
    for batch in itertools.islice(batches, steps):
        loss = task(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_loss_falls(task_shards, tiny_config, tokenizer):
    task = make_task(tiny_config, tokenizer)
    stream = (on_device(b) for b in loader(task, tokenizer, str(task_shards.grounding / "train"), train=True))
    held = on_device(next(iter(loader(task, tokenizer, str(task_shards.grounding / "train"), train=False))))
    with torch.no_grad():
        before = task(held).loss.item()
    train(task, stream, FALL_STEPS)
    with torch.no_grad():
        after = task(held).loss.item()
    assert after < FALL_RATIO * before, (before, after)


def test_a_memorised_batch_is_decoded_back_to_its_boxes(task_shards, tiny_config, tokenizer, tmp_path):
    task = make_task(tiny_config, tokenizer)
    batch = on_device(next(iter(loader(task, tokenizer, str(task_shards.grounding / "train"), train=False))))
    train(task, itertools.repeat(batch), MEMORISE_STEPS)
    metrics = task.evaluate([batch], EvalContext(tmp_path))
    assert metrics["accuracy"] == 100.0
    assert metrics["mean_iou"] > MEMORISED_IOU
