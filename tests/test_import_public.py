"""`mplug import clip` and `mplug import bert`: public initialisations land in a new (or given) package exactly."""

from __future__ import annotations

import pytest
import torch
from test_weights import OPENAI_UNUSED, save_torchscript, timm_to_openai
from transformers import BertConfig, BertForMaskedLM

from cluster.cli import main
from pretrain.models.vision import build_vit, resize_position_embedding
from pretrain.package import load_package, read_package_info

CLIP_GRID = 4  # the checkpoint's patch grid; the tiny model's is 8 (64 px, patch 8)
OPENAI_UNUSED_COUNT = len(OPENAI_UNUSED)  # CLIP's text tower and image projection, dropped on import


def openai_layout(vit_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return timm_to_openai(vit_state)


@pytest.fixture(scope="module")
def clip_vit(tiny_vision_config):
    """A CLIP ViT of the tiny preset's sizes trained at 32 px (a 4x4 grid), random weights."""
    torch.manual_seed(1)
    return build_vit(tiny_vision_config).state_dict()


@pytest.fixture(scope="module")
def tiny_vision_config():
    import dataclasses

    from pretrain.config import load_config

    return dataclasses.replace(load_config("tiny").model.vision, image_size=CLIP_GRID * 8)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """A Hugging Face BERT of the tiny text sizes, 5 layers (2 encoder + 3 fusion), saved with its vocabulary."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=64, num_hidden_layers=5)
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_openai_clip_file_lands_in_a_new_package_with_position_embeddings_resized(tmp_path, clip_vit, tokenizer_dir):
    checkpoint = tmp_path / "ViT-tiny.pt"
    torch.save(openai_layout(clip_vit), checkpoint)
    assert main(["import", "clip", str(checkpoint), "--config", "tiny", "--output", str(tmp_path / "pkg"),
                 "--tokenizer", str(tokenizer_dir)]) == 0
    vit = load_package(tmp_path / "pkg").model.vision.vit.state_dict()
    for key, value in clip_vit.items():
        if key == "pos_embed":
            assert torch.equal(vit[key], resize_position_embedding(value, 8))  # 4x4 -> 8x8, [CLS] kept
            assert torch.equal(vit[key][:, 0], value[:, 0])
        else:
            assert torch.equal(vit[key], value), key


def test_clip_import_sets_the_momentum_copy_to_the_imported_tower(tmp_path, clip_vit, tokenizer_dir):
    torch.save(openai_layout(clip_vit), tmp_path / "clip.tar")  # mPLUG's ViT-B-16.tar is such a file
    assert main(["import", "clip", str(tmp_path / "clip.tar"), "--config", "tiny", "--output", str(tmp_path / "pkg"),
                 "--tokenizer", str(tokenizer_dir)]) == 0
    model = load_package(tmp_path / "pkg").model
    for key, value in model.vision.state_dict().items():
        assert torch.equal(model.momentum.vision.state_dict()[key], value), key
    info = read_package_info(tmp_path / "pkg")
    assert info.extra["initialised_from"]["clip"]["layout"] == "openai"
    assert info.extra["initialised_from"]["clip"]["dropped"] == OPENAI_UNUSED_COUNT


def test_openai_torchscript_archive_imports(tmp_path, clip_vit, tokenizer_dir):
    save_torchscript(openai_layout(clip_vit), tmp_path / "ViT-tiny.pt")
    assert main(["import", "clip", str(tmp_path / "ViT-tiny.pt"), "--config", "tiny", "--output",
                 str(tmp_path / "pkg"), "--tokenizer", str(tokenizer_dir)]) == 0
    vit = load_package(tmp_path / "pkg").model.vision.vit.state_dict()
    assert torch.equal(vit["blocks.1.attn.qkv.weight"], clip_vit["blocks.1.attn.qkv.weight"])


def test_open_clip_training_checkpoint_imports(tmp_path, clip_vit, tokenizer_dir):
    # open_clip saves {"epoch", "name", "state_dict": {"module.visual...."}} from a DDP-wrapped model
    state = {"module." + key: value for key, value in openai_layout(clip_vit).items()}
    torch.save({"epoch": 32, "name": "ViT-tiny", "state_dict": state}, tmp_path / "epoch_32.pt")
    assert main(["import", "clip", str(tmp_path / "epoch_32.pt"), "--config", "tiny", "--output",
                 str(tmp_path / "pkg"), "--tokenizer", str(tokenizer_dir)]) == 0
    vit = load_package(tmp_path / "pkg").model.vision.vit.state_dict()
    assert torch.equal(vit["patch_embed.proj.weight"], clip_vit["patch_embed.proj.weight"])


def test_bert_directory_lands_in_text_encoder_fusion_and_decoder_with_its_vocabulary(tmp_path, bert_dir, tokenizer):
    assert main(["import", "bert", str(bert_dir), "--config", "tiny", "--output", str(tmp_path / "pkg")]) == 0
    loaded = load_package(tmp_path / "pkg")
    model, bert = loaded.model, BertForMaskedLM.from_pretrained(str(bert_dir)).state_dict()
    own = model.state_dict()
    for i in range(2):
        assert torch.equal(own[f"text_encoder.layers.{i}.attention.self.query.weight"],
                           bert[f"bert.encoder.layer.{i}.attention.self.query.weight"])
    for j in range(3):
        assert torch.equal(own[f"fusion.layers.{j}.output.dense.weight"], bert[f"bert.encoder.layer.{2 + j}.output.dense.weight"])
    assert torch.equal(own["decoder.layers.1.intermediate.dense.bias"], bert["bert.encoder.layer.1.intermediate.dense.bias"])
    assert torch.equal(own["decoder.embeddings.word_embeddings.weight"], bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(own["mlm_head.head.predictions.transform.dense.weight"], bert["cls.predictions.transform.dense.weight"])
    assert torch.equal(own["momentum.text_encoder.layers.1.output.dense.weight"], bert["bert.encoder.layer.1.output.dense.weight"])
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()  # the BERT folder's own vocabulary


def test_bert_into_a_clip_package_keeps_the_vision_tower(tmp_path, clip_vit, bert_dir, tokenizer_dir):
    torch.save(openai_layout(clip_vit), tmp_path / "clip.pt")
    assert main(["import", "clip", str(tmp_path / "clip.pt"), "--config", "tiny", "--output", str(tmp_path / "a"),
                 "--tokenizer", str(tokenizer_dir)]) == 0
    assert main(["import", "bert", str(bert_dir), "--package", str(tmp_path / "a"), "--output", str(tmp_path / "b")]) == 0
    model = load_package(tmp_path / "b").model
    assert torch.equal(model.vision.vit.state_dict()["blocks.0.mlp.fc1.weight"], clip_vit["blocks.0.mlp.fc1.weight"])
    bert = BertForMaskedLM.from_pretrained(str(bert_dir)).state_dict()
    assert torch.equal(model.text_encoder.state_dict()["layers.0.output.dense.bias"],
                       bert["bert.encoder.layer.0.output.dense.bias"])
    assert set(read_package_info(tmp_path / "b").extra["initialised_from"]) == {"clip", "bert"}


def test_a_clip_of_other_sizes_is_refused_with_both_sizes(tmp_path, tokenizer_dir, capsys):
    import dataclasses

    from pretrain.config import load_config

    wide = dataclasses.replace(load_config("tiny").model.vision, width=96, heads=2)
    torch.save(openai_layout(build_vit(wide).state_dict()), tmp_path / "wide.pt")
    assert main(["import", "clip", str(tmp_path / "wide.pt"), "--config", "tiny", "--output", str(tmp_path / "pkg"),
                 "--tokenizer", str(tokenizer_dir)]) == 2
    error = capsys.readouterr().err
    assert "width=96" in error and "width=64" in error
    assert not (tmp_path / "pkg").exists()
