"""Shared fixtures: the tiny preset with a tokenizer trained on synthetic captions."""

from __future__ import annotations

import sys

import pytest
import torch

from data_prep.batch import image_tensor, tokenize
from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import train_wordpiece
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer


@pytest.fixture(scope="session")
def synthetic_scenes():
    return make_scenes(8, seed=3)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, synthetic_scenes):
    texts = vocabulary_texts() + [s.caption for s in make_scenes(64, seed=11)]
    return train_wordpiece(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=200)


@pytest.fixture
def tiny_config(tokenizer):
    def build(*overrides: str):
        return with_tokenizer(load_config("tiny", overrides), tokenizer)

    return build


@pytest.fixture
def pair_batch(synthetic_scenes, tokenizer):
    """Eight synthetic image-caption pairs as model inputs, each its own image id."""
    images = torch.stack([image_tensor(s.image, 64) for s in synthetic_scenes])
    text = tokenize(tokenizer, [s.caption for s in synthetic_scenes], 24)
    return {"images": images, **text, "image_ids": torch.arange(len(synthetic_scenes))}


@pytest.fixture(scope="session")
def task_shards(tmp_path_factory):
    """Synthetic COCO-Karpathy, VQA v2 and RefCOCO data converted to task shards (data_prep.synthetic_task_shards)."""
    from data_prep.synthetic_task_shards import write_task_shards

    return write_task_shards(tmp_path_factory.mktemp("task-shards"))


@pytest.fixture(scope="session")
def video_task_shards(tmp_path_factory):
    """Moving-shape clips as video_qa, video_caption (= video_retrieval) and action_classification
    shards (data_prep.synthetic_video): 96 train clips, 30 val, 30 test; 8 frames of 64 px."""
    from data_prep.synthetic_video import write_video_task_shards

    return write_video_task_shards(tmp_path_factory.mktemp("video-task-shards"))


@pytest.fixture(scope="session")
def video_pretrain_shards(tmp_path_factory):
    """64 moving-shape clips with captions as pretraining shards (KEY.mp4, KEY.txt, KEY.json with image_id)."""
    from data_prep.synthetic_video import write_video_pretrain_shards

    return write_video_pretrain_shards(tmp_path_factory.mktemp("video-pretrain-shards"), 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on loopback (see mlflow_server.py), stopped after the module."""
    from mlflow_server import MLFLOW, Server

    from pretrain.launch import free_port

    if not MLFLOW.exists():
        pytest.skip(f"the mlflow command is not installed beside {sys.executable}")
    folder = tmp_path_factory.mktemp("mlflow-server")
    running = Server(free_port(), folder / "server.db", folder / "artifacts", folder / "server.log")
    running.start()
    yield running
    running.stop()
