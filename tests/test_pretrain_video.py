"""mPLUG-2 pretraining: every step one image batch and one video batch, through all four objectives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_pretrain import pretraining_data  # noqa: F401 - the image shards and their tokenizer

from data_prep.batch import image_tensor, tokenize
from data_prep.synthetic import make_scenes
from data_prep.synthetic_video import write_video_pretrain_shards
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.objectives.pretraining import MPLUGPretraining

FRAMES = 4
IMAGE_LOSSES = ["itc", "itm", "mlm", "prefix_lm"]
VIDEO_LOSSES = ["video_itc", "video_itm", "video_mlm", "video_prefix_lm"]


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    return write_video_pretrain_shards(tmp_path_factory.mktemp("video-pretrain"), 24, seed=5, frames=FRAMES, size=64)


def mplug2_tiny(tokenizer, *overrides: str):
    return with_tokenizer(load_config("mplug2_tiny", ["model.queue_size=16", *overrides]), tokenizer)


def pairs(tokenizer, count: int, *, frames: int = 0) -> dict[str, torch.Tensor]:
    scenes = make_scenes(count, seed=3)
    images = torch.stack([image_tensor(s.image, 64) for s in scenes])  # (B, 3, 64, 64)
    if frames:
        images = images[:, None].expand(-1, frames, -1, -1, -1).contiguous()  # (B, T, 3, 64, 64)
    return {"images": images, **tokenize(tokenizer, [s.caption for s in scenes], 24), "image_ids": torch.arange(count)}


def test_a_step_with_a_video_batch_adds_the_four_video_losses_to_the_image_ones(tokenizer):
    torch.manual_seed(0)
    model = MPLUGPretraining(mplug2_tiny(tokenizer))
    images, clips = pairs(tokenizer, 8), pairs(tokenizer, 8, frames=FRAMES)
    out = model(images["images"], images["input_ids"], images["attention_mask"], images["image_ids"], step=5,
                video=clips)
    assert list(out.losses) == IMAGE_LOSSES + VIDEO_LOSSES
    assert all(torch.isfinite(loss) and loss > 0 for loss in out.losses.values())
    assert torch.allclose(out.loss, torch.stack(list(out.losses.values())).sum())
    # The clips' momentum features went to the video queue, the images' to the image queue.
    assert int(model.queue.filled) == 8 and int(model.video_queue.filled) == 8
    out.loss.backward()
    temporal = model.model.vision.temporal
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in temporal.parameters())


def test_without_a_video_batch_only_the_image_losses_run(tokenizer):
    model = MPLUGPretraining(mplug2_tiny(tokenizer))
    images = pairs(tokenizer, 4)
    out = model(images["images"], images["input_ids"], images["attention_mask"], images["image_ids"])
    assert list(out.losses) == IMAGE_LOSSES
    assert int(model.video_queue.filled) == 0


def test_a_model_without_temporal_modules_refuses_a_video_batch(tokenizer):
    model = MPLUGPretraining(with_tokenizer(load_config("tiny", ["model.queue_size=16"]), tokenizer))
    assert model.video_queue is None  # an image model allocates no video queue
    images, clips = pairs(tokenizer, 4), pairs(tokenizer, 4, frames=2)
    with pytest.raises(ValueError, match="model.video.temporal"):
        model(images["images"], images["input_ids"], images["attention_mask"], video=clips)


def test_mplug_pretrain_refuses_video_data_for_an_image_config(pretraining_data, video_shards, tmp_path):  # noqa: F811
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "pretrain", "--config", "tiny", "--data", str(pretraining_data / "shards"),
         "--video-data", str(video_shards), "--output", str(tmp_path / "run"), "--tokenizer",
         str(pretraining_data / "tokenizer"), "--max-steps", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--video-data needs a video model" in result.stderr and "mplug2_tiny" in result.stderr
