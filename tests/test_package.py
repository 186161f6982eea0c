"""The model package: export, atomic replacement, strict loading, tied weights, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain import package as package_module
from pretrain.config import load_config
from pretrain.models.mplug import MPLUG
from pretrain.objectives.pretraining import MPLUGPretraining
from pretrain.package import (
    PackageError,
    export_package,
    export_state_dict,
    load_package,
    sha256_of,
    tied_aliases,
)

CAPTION = "a red circle above a blue square"


@pytest.fixture
def config(tiny_config):
    return tiny_config()


@pytest.fixture
def model(config):
    """A tiny model whose momentum copies differ from the online modules, as after training."""
    torch.manual_seed(0)
    model = MPLUG(config.model)
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def exported(tmp_path, model, config, tokenizer):
    return export_package(tmp_path / "package", model, config, tokenizer, step=7, run_id="abc123")


def outputs(model: MPLUG, batch: dict) -> dict[str, torch.Tensor]:
    """Every path through the model on one batch."""
    with torch.no_grad():
        vision = model.encode_image(batch["images"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = model.fuse(text, batch["attention_mask"], vision)
        memory_mask = torch.ones(vision.shape[:2], dtype=torch.long)
        result = {
            "vision": vision,
            "text": text,
            "fused": fused.text,
            "mlm": model.mlm_head(fused.text),
            "itm": model.itm_head(fused.text[:, 0]),
            "decoded": model.decode(batch["input_ids"], batch["attention_mask"], vision, memory_mask),
        }
        if model.momentum is not None:
            result["momentum_vision"] = model.momentum.vision(batch["images"])
        return result


def assert_same_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> None:
    for key in keys or a:
        assert torch.equal(a[key], b[key]), key


def test_package_holds_weights_config_tokenizer_and_info(exported, model):
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.yaml", "model.safetensors", "package.json", "tokenizer"
    ]
    info = json.loads((exported / "package.json").read_text())
    assert info["format_version"] == 1
    assert (info["step"], info["run_id"], info["momentum"], info["dtype"]) == (7, "abc123", True, "float32")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["weights_sha256"] == sha256_of(exported / "model.safetensors")
    assert info["created"].endswith("+00:00")


def test_tied_tensors_are_stored_once(exported, model):
    stored = load_file(exported / "model.safetensors")
    aliases = tied_aliases(model)
    assert aliases["mlm_head.head.predictions.decoder.weight"] == "text_encoder.embeddings.word_embeddings.weight"
    assert aliases["decoder.lm_head.head.predictions.decoder.weight"] == "decoder.embeddings.word_embeddings.weight"
    assert not set(aliases) & set(stored)
    assert set(stored) | set(aliases) == set(model.state_dict())
    assert json.loads((exported / "package.json").read_text())["tied"] == aliases


def test_loaded_model_gives_identical_outputs(exported, model, pair_batch):
    loaded = load_package(exported).model
    assert not loaded.training
    assert_same_outputs(outputs(model, pair_batch), outputs(loaded, pair_batch))


def test_loaded_model_gives_identical_pretraining_losses(exported, model, config, pair_batch):
    losses = []
    for m in (model, load_package(exported).model):
        torch.manual_seed(5)  # MLM masking, ITM negatives and the PrefixLM split are random
        losses.append(MPLUGPretraining(config, m).eval()(**pair_batch, step=10).losses)
    assert losses[0].keys() == {"itc", "itm", "mlm", "prefix_lm"}
    assert_same_outputs(losses[0], losses[1])


def test_loaded_state_dict_is_identical(exported, model):
    original, loaded = model.state_dict(), load_package(exported).model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)


def test_tied_weights_stay_tied_after_loading(exported, model):
    loaded = load_package(exported).model
    assert tied_aliases(loaded) == tied_aliases(model)
    embeddings = loaded.text_encoder.embeddings.word_embeddings.weight
    output = loaded.mlm_head.head.predictions.decoder.weight
    assert output is embeddings and output.data_ptr() == embeddings.data_ptr()
    with torch.no_grad():
        embeddings[3].fill_(0.5)
    assert torch.equal(output[3], torch.full_like(output[3], 0.5))
    assert loaded.decoder.lm_head.head.predictions.decoder.weight is loaded.decoder.embeddings.word_embeddings.weight
    assert (loaded.momentum.mlm_head.head.predictions.decoder.weight
            is loaded.momentum.text_encoder.embeddings.word_embeddings.weight)


def test_config_round_trips(exported, config):
    assert load_package(exported).config == config


def test_tokenizer_round_trips(exported, tokenizer):
    loaded = load_package(exported).tokenizer
    assert loaded(CAPTION)["input_ids"] == tokenizer(CAPTION)["input_ids"]
    assert len(loaded) == len(tokenizer)
    assert loaded.mask_token_id == tokenizer.mask_token_id


def test_info_round_trips(exported):
    info = load_package(exported).info
    assert (info.step, info.run_id, info.momentum, info.extra) == (7, "abc123", True, {})


def test_loading_does_not_read_the_initialisation_files_the_config_names(tmp_path, tiny_config, tokenizer, pair_batch):
    config = tiny_config(f"model.vision.weights={tmp_path}/absent_clip.pt", f"model.text.weights={tmp_path}/absent_bert")
    model = MPLUG(config.model).eval()
    loaded = load_package(export_package(tmp_path / "package", model, config, tokenizer))
    assert loaded.config.model.text.weights == f"{tmp_path}/absent_bert"
    assert_same_outputs(outputs(model, pair_batch), outputs(loaded.model, pair_batch))


def test_loading_without_momentum_skips_the_copies(exported, model, pair_batch):
    loaded = load_package(exported, momentum=False).model
    assert loaded.momentum is None
    assert not any(name.startswith("momentum.") for name in loaded.state_dict())
    assert_same_outputs(outputs(model, pair_batch), outputs(loaded, pair_batch), keys=["vision", "fused", "decoded"])


def test_package_without_momentum_loads_only_without_momentum(tmp_path, config, tokenizer):
    path = export_package(tmp_path / "package", MPLUG(config.model, momentum=False), config, tokenizer)
    assert load_package(path, momentum=False).info.momentum is False
    with pytest.raises(PackageError, match="exported without momentum copies; load it with momentum=False"):
        load_package(path)


def test_export_replaces_an_existing_package(tmp_path, exported, model, config, tokenizer):
    export_package(exported, model, config, tokenizer, step=8, extra={"note": "second"})
    info = load_package(exported).info
    assert (info.step, info.extra) == (8, {"note": "second"})
    assert [p.name for p in tmp_path.iterdir()] == ["package"]  # no staging or old copy left behind


def test_failed_export_leaves_the_previous_package_whole(tmp_path, exported, model, config, tokenizer, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(package_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_package(exported, model, config, tokenizer, step=8)
    assert [p.name for p in tmp_path.iterdir()] == ["package"]
    assert load_package(exported).info.step == 7


def test_export_refuses_to_replace_a_directory_that_is_not_a_package(tmp_path, model, config, tokenizer):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model package and is not overwritten"):
        export_package(tmp_path / "results", model, config, tokenizer)
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"


def test_export_needs_a_tokenizer(tmp_path, model, config):
    with pytest.raises(PackageError, match="a package needs a tokenizer"):
        export_package(tmp_path / "package", model, config)


def test_export_of_a_wrapper_state_dict_takes_the_model_keys(tmp_path, model, config, tokenizer):
    wrapped = MPLUGPretraining(config, model).state_dict()  # "model.*" plus the ITC queue's "queue.*"
    path = export_state_dict(tmp_path / "package", wrapped, config, tokenizer, prefix="model.")
    loaded = load_package(path).model.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in model.state_dict().items())


def test_export_of_a_gathered_state_dict_with_tied_copies(tmp_path, model, config, tokenizer, pair_batch):
    gathered = {key: value.clone() for key, value in model.state_dict().items()}  # ties as equal copies
    path = export_state_dict(tmp_path / "package", gathered, config, tokenizer)
    assert_same_outputs(outputs(model, pair_batch), outputs(load_package(path).model, pair_batch))


def test_export_of_a_state_dict_missing_a_tensor_names_it(tmp_path, model, config, tokenizer):
    state = model.state_dict()
    del state["itm_head.bias"]
    with pytest.raises(PackageError, match=r"1 tensors missing \(itm_head.bias\) and 0 unexpected"):
        export_state_dict(tmp_path / "package", state, config, tokenizer)
    assert not (tmp_path / "package").exists()


def test_incomplete_folder_names_what_is_missing(exported):
    (exported / "model.safetensors").unlink()
    with pytest.raises(PackageError, match=r"is not a model package: it lacks model.safetensors\. A package holds"):
        load_package(exported)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        load_package(tmp_path / "nowhere")


def test_unknown_format_version_is_refused(exported):
    info = json.loads((exported / "package.json").read_text())
    (exported / "package.json").write_text(json.dumps({**info, "format_version": 9}))
    with pytest.raises(PackageError, match="has format_version 9; this code reads format version 1"):
        load_package(exported)


def test_changed_weights_file_fails_the_checksum(exported):
    stored = load_file(exported / "model.safetensors")
    stored["temp"] = stored["temp"] + 1
    save_file(stored, exported / "model.safetensors")
    with pytest.raises(PackageError, match="model.safetensors has sha256 .* but package.json records"):
        load_package(exported)


def rewrite_weights(directory, change) -> None:
    """Rewrite the weights file through `change` and record its new checksum, as a re-export would."""
    stored = load_file(directory / "model.safetensors")
    change(stored)
    save_file(stored, directory / "model.safetensors")
    info = json.loads((directory / "package.json").read_text())
    info["weights_sha256"] = sha256_of(directory / "model.safetensors")
    (directory / "package.json").write_text(json.dumps(info))


def test_weights_missing_a_tensor_name_it(exported):
    rewrite_weights(exported, lambda stored: stored.pop("itm_head.weight"))
    with pytest.raises(PackageError, match=r"1 tensors missing \(itm_head.weight\) and 0 unexpected \(none\)"):
        load_package(exported)


def test_weights_with_an_unknown_tensor_name_it(exported):
    rewrite_weights(exported, lambda stored: stored.update({"extra_head.weight": torch.zeros(2)}))
    with pytest.raises(PackageError, match=r"0 tensors missing \(none\) and 1 unexpected \(extra_head.weight\)"):
        load_package(exported)


def test_weights_of_another_shape_name_the_tensor(exported):
    rewrite_weights(exported, lambda stored: stored.update({"itm_head.weight": torch.zeros(3, 64)}))
    with pytest.raises(PackageError, match=r"itm_head.weight is \(3, 64\) but the model built from the config has \(2, 64\)"):
        load_package(exported)


def test_export_refuses_a_tokenizer_the_config_was_not_fitted_to(tmp_path, tokenizer):
    config = load_config("tiny")  # vocab_size 1000, without with_tokenizer
    expected = (f"vocab_size=1000 but the tokenizer's is {len(tokenizer)}; cls_id=101 but the tokenizer's is "
                f"{tokenizer.cls_token_id}; sep_id=102 but the tokenizer's is {tokenizer.sep_token_id}; mask_id=103 "
                f"but the tokenizer's is {tokenizer.mask_token_id}; build the config with")
    with pytest.raises(PackageError, match=expected):
        export_package(tmp_path / "package", MPLUG(config.model), config, tokenizer)
