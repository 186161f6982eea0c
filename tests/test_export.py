"""`mplug export`: a package as plain safetensors or as timm + transformers folders, loaded back unchanged."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from transformers import BertLMHeadModel, BertModel

from cluster.cli import main
from pretrain.export import ExportError, export_package_as, load_export
from pretrain.models.mplug import MPLUG, image_feature, text_feature
from pretrain.package import export_package


@pytest.fixture(scope="module")
def package(tmp_path_factory, tokenizer):
    """A tiny package with distinct random weights (every tensor, heads and temperature included)."""
    from pretrain.config import load_config
    from pretrain.config.tokens import with_tokenizer

    config = with_tokenizer(load_config("tiny"), tokenizer)
    torch.manual_seed(3)
    model = MPLUG(config.model, momentum=True)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.05)  # norms and biases off their initial values too
    path = export_package(tmp_path_factory.mktemp("pkg") / "package", model, config, tokenizer)
    return path, model.eval()


def export_with_the_cli(package, tmp_path_factory, fmt: str):
    path, _ = package
    output = tmp_path_factory.mktemp(fmt) / "export"
    assert main(["export", str(path), "--format", fmt, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def safetensors_export(package, tmp_path_factory):
    return export_with_the_cli(package, tmp_path_factory, "safetensors")


@pytest.fixture(scope="module")
def hf_export(package, tmp_path_factory):
    return export_with_the_cli(package, tmp_path_factory, "hf")


def outputs(model: MPLUG, batch: dict) -> dict[str, torch.Tensor]:
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        vision = model.encode_image(images)
        text = model.encode_text(ids, mask)
        fused = model.fuse(text, mask, vision)
        memory_mask = torch.cat([torch.ones(vision.shape[:2], dtype=torch.long), mask], 1)
        return {"vision": vision, "text": text, "fused": fused.joint(),
                "image_feat": image_feature(model, vision), "text_feat": text_feature(model, text),
                "itm": model.itm_head(fused.text[:, 0]), "mlm": model.mlm_head(fused.text),
                "decoder": model.decode(ids, mask, fused.joint(), memory_mask)}


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_exported_model_loads_back_with_identical_outputs(fmt, request, package, pair_batch):
    output = request.getfixturevalue(f"{fmt}_export")
    _, model = package
    expected, got = outputs(model, pair_batch), outputs(load_export(output), pair_batch)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_safetensors_export_stores_online_tensors_once_without_momentum(safetensors_export):
    output = safetensors_export
    with safe_open(output / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert not any(name.startswith("momentum.") for name in names)
    assert "decoder.lm_head.head.predictions.decoder.weight" not in names  # tied to the decoder's word embeddings
    meta = json.loads((output / "config.json").read_text())
    assert meta["tied"]["decoder.lm_head.head.predictions.decoder.weight"] == "decoder.embeddings.word_embeddings.weight"
    assert meta["model"]["fusion"] == {"layers": 3, "stride": 2}
    assert (output / "tokenizer" / "tokenizer.json").is_file()


def test_exported_vision_tower_loads_in_timm_and_gives_the_vision_tokens(hf_export, package, pair_batch):
    output = hf_export
    _, model = package
    vit = timm.create_model(f"local-dir:{output / 'vision'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(pair_batch["images"]),
                                   model.vision.vit.forward_features(pair_batch["images"]), rtol=0, atol=0)
    assert vit.pretrained_cfg["input_size"] == (3, 64, 64)


def test_exported_text_encoder_is_a_transformers_bert_model(hf_export, package, pair_batch):
    output = hf_export
    _, model = package
    bert = BertModel.from_pretrained(str(output / "text_encoder"), add_pooling_layer=False).eval()
    ids, mask = pair_batch["input_ids"], pair_batch["attention_mask"]
    with torch.no_grad():
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(theirs, model.encode_text(ids, mask), rtol=1e-5, atol=1e-5)


def test_exported_decoder_is_a_transformers_lm_head_model_over_the_fused_memory(hf_export, package, pair_batch):
    output = hf_export
    _, model = package
    decoder = BertLMHeadModel.from_pretrained(str(output / "decoder")).eval()
    ids, mask = pair_batch["input_ids"], pair_batch["attention_mask"]
    with torch.no_grad():
        vision = model.encode_image(pair_batch["images"])
        memory = model.fuse(model.encode_text(ids, mask), mask, vision).joint()
        memory_mask = torch.cat([torch.ones(vision.shape[:2], dtype=torch.long), mask], 1)
        theirs = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
                         encoder_attention_mask=memory_mask).logits
        torch.testing.assert_close(theirs, model.decode(ids, mask, memory, memory_mask), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_folder_that_is_not_empty(package, tmp_path):
    path, _ = package
    (tmp_path / "taken.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_package_as(path, tmp_path, "hf")


def test_export_refuses_an_unknown_format(package, tmp_path):
    path, _ = package
    with pytest.raises(ExportError, match="choose one of safetensors, hf"):
        export_package_as(path, tmp_path / "out", "onnx")
