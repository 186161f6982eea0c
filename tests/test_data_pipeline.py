"""The whole data path on synthetic data: served on loopback, downloaded on Ray, converted, loaded, trained on."""

from __future__ import annotations

import itertools

import pytest
import torch

from data_prep.batch import normalize
from data_prep.convert import convert_coco_karpathy, convert_refcoco, convert_vqa_v2
from data_prep.download import DownloadOptions, download
from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.serve import LoopbackServer
from data_prep.synthetic import vocabulary_texts
from data_prep.synthetic_export import write_synthetic, write_url_list
from data_prep.tokenizer import shard_captions, train_wordpiece
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.objectives.pretraining import MPLUGPretraining

IMAGES = 60
SIZE = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), IMAGES, seed=5, image_size=SIZE)


@pytest.fixture(scope="module")
def downloaded(synthetic, tmp_path_factory):
    output = tmp_path_factory.mktemp("shards")
    with LoopbackServer(synthetic.root) as server:
        write_url_list(synthetic.root, server.base_url)
        summary = download(DownloadOptions(str(synthetic.urls_parquet), str(output), image_size=SIZE,
                                           processes=1, threads=8, shard_size=25, progress=False))
    return output, summary


def test_the_downloaded_synthetic_shards_train_the_tiny_model(downloaded, tmp_path):
    output, summary = downloaded
    assert (summary["count"], summary["success"], summary["failures"]) == (IMAGES, IMAGES, {})
    tokenizer = train_wordpiece(vocabulary_texts() + list(shard_captions(str(output))), tmp_path / "tok", 300)
    config = with_tokenizer(load_config("tiny", ["objectives.distill=false", "model.queue_size=16"]), tokenizer)
    loader = ShardLoader(str(output), LoaderConfig(batch_size=8, image_size=SIZE, augment="pretrain", randaugment=False,
                                                   workers=1, shuffle_buffer=30), tokenizer=tokenizer,
                         rank=0, world_size=1)
    torch.manual_seed(0)
    model = MPLUGPretraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step, batch in enumerate(itertools.islice(loader, 40)):
        out = model(normalize(batch["images"]), batch["input_ids"], batch["attention_mask"], step=step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert loader.stats["corrupt_samples"] == 0 and loader.stats["samples"] == 40 * 8


def test_converted_caption_shards_hold_every_caption_of_the_train_images(synthetic, tmp_path):
    report = convert_coco_karpathy(synthetic.karpathy_coco, tmp_path / "coco", synthetic.images_dir)
    assert report.total_skipped == 0
    loader = ShardLoader(str(tmp_path / "coco" / "train" / "manifest.json"),
                         LoaderConfig(batch_size=16, image_size=SIZE, mode="epoch", augment="eval", workers=0),
                         rank=0, world_size=1)
    samples = [(text, meta) for batch in loader for text, meta in zip(batch["texts"], batch["meta"], strict=True)]
    assert len(samples) == report.converted["train"] == synthetic.splits["train"] * 5
    assert all(text in meta["captions"] for text, meta in samples)


def test_converted_vqa_shards_load_questions_with_weighted_answers(synthetic, tmp_path):
    convert_vqa_v2([synthetic.vqa_questions("train2014")], tmp_path / "vqa", synthetic.images_dir,
                   annotations=[synthetic.vqa_annotations("train2014")])
    config = LoaderConfig(batch_size=8, image_size=SIZE, mode="epoch", augment="finetune", workers=0,
                          text_field="question")
    batch = next(iter(ShardLoader(str(tmp_path / "vqa" / "train"), config, rank=0, world_size=1)))
    for question, meta in zip(batch["texts"], batch["meta"], strict=True):
        assert question == meta["question"] and question.endswith("?")
        assert sum(meta["weights"]) == pytest.approx(1.0) and meta["answers"]


def test_converted_grounding_shards_carry_their_boxes_through_resize_and_flip(synthetic, tmp_path):
    convert_refcoco(synthetic.refcoco_refs, synthetic.refcoco_instances, tmp_path / "ref", synthetic.images_dir)
    size = 32  # half the written images: boxes halve too
    config = LoaderConfig(batch_size=64, image_size=size, mode="epoch", augment="finetune", crop=False,
                          randaugment=False, workers=0, text_field="sentence", box_field="box")
    batches = list(ShardLoader(str(tmp_path / "ref" / "train"), config, rank=0, world_size=1))
    assert batches
    for batch in batches:
        for image, meta in zip(batch["images"], batch["meta"], strict=True):
            x, y, w, h = meta["box"]
            assert 0 <= x and x + w <= size + 1e-4 and 0 <= y and y + h <= size + 1e-4
            centre = image[:, int(y + h / 2), int(x + w / 2)].float()
            assert (centre - 242).abs().max() > 30  # the box centre is on a shape, not the pale background
