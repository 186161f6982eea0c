"""Loading pretrained parts from local files: CLIP ViTs (timm and OpenAI layouts), BERT, tokenizer."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from pretrain.config import load_config
from pretrain.models.factory import build_mplug
from pretrain.models.mplug import MOMENTUM_MODULES, MPLUG
from pretrain.models.vision import build_vit
from pretrain.models.weights import (
    load_bert_weights,
    load_pretrained_parts,
    load_tokenizer,
    load_vision_weights,
    read_clip_state_dict,
)

# The CLIP text tower and image projection of an OpenAI checkpoint, none of which mPLUG uses.
OPENAI_UNUSED = {
    "token_embedding.weight": (100, 64),
    "positional_embedding": (8, 64),
    "transformer.resblocks.0.attn.in_proj_weight": (192, 64),
    "ln_final.weight": (64,),
    "text_projection": (64, 32),
    "logit_scale": (),
    "visual.proj": (64, 32),
}
OPENAI_STEM_NAMES = {  # timm tensor outside the blocks -> OpenAI's
    "patch_embed.proj.weight": "conv1.weight",
    "norm_pre.weight": "ln_pre.weight",
    "norm_pre.bias": "ln_pre.bias",
    "norm.weight": "ln_post.weight",
    "norm.bias": "ln_post.bias",
}
OPENAI_BLOCK_NAMES = {  # timm block tensor -> OpenAI's
    "norm1": "ln_1",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


@pytest.fixture(scope="module")
def cfg():
    # Patch 16 on 64 px: a 4x4 grid, small enough to spell out the bilinear values below.
    return load_config("tiny", ["model.vision.patch_size=16"]).model


def build_model(cfg) -> MPLUG:
    torch.manual_seed(0)
    return MPLUG(cfg)


def random_vit_state(cfg, seed: int = 1, **sizes) -> dict[str, torch.Tensor]:
    """A timm ViT state dict of the tiny vision sizes (overridden by `sizes`), every value random."""
    vision = dataclasses.replace(cfg.vision, **sizes)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in build_vit(vision).state_dict().items()}


def timm_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the loader's mapping: a timm ViT state dict in OpenAI CLIP's full layout."""
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)  # (1, 1, D) -> (D,)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]  # (1, 1 + N, D) -> (1 + N, D)
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            old = next(name for name in OPENAI_BLOCK_NAMES if rest.startswith(name))
            key = f"transformer.resblocks.{index}.{OPENAI_BLOCK_NAMES[old]}{rest[len(old):]}"
        else:
            key = OPENAI_STEM_NAMES[key]
        out["visual." + key] = value
    out.update({key: torch.randn(shape) for key, shape in OPENAI_UNUSED.items()})
    return out


def assert_vit_holds(model: MPLUG, state: dict[str, torch.Tensor]) -> None:
    loaded = model.vision.vit.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


class Holder(nn.Module):
    """A module that only holds tensors, to write a TorchScript archive like OpenAI's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state: dict[str, torch.Tensor], path) -> None:
    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, Holder())
            module = module._modules[name]
        module.register_parameter(leaf, nn.Parameter(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(root).save(str(path))


# --- vision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["safetensors", "nested_pth", "visual_prefixed_bin"])
def test_timm_layout_lands_exactly_in_the_vit(cfg, tmp_path, container):
    state = random_vit_state(cfg)
    if container == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file(state, path)
    elif container == "nested_pth":  # a training checkpoint wrapped by DistributedDataParallel
        path = tmp_path / "vit.pth"
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:  # open_clip-style: the ViT under `visual.`, a CLIP projection as timm's `head`
        path = tmp_path / "vit.bin"
        projection = {"visual.head.weight": torch.randn(32, 64)}
        torch.save({**{"visual." + k: v for k, v in state.items()}, **projection}, path)
    model = build_model(cfg)

    load_vision_weights(model.vision, path)

    assert_vit_holds(model, state)


def test_openai_layout_maps_to_timm_names_and_drops_the_text_tower(cfg, tmp_path):
    state = random_vit_state(cfg)
    torch.save(timm_to_openai(state), tmp_path / "clip.pt")

    ckpt = read_clip_state_dict(tmp_path / "clip.pt")

    assert ckpt.layout == "openai"
    assert sorted(ckpt.dropped) == sorted(OPENAI_UNUSED)
    assert sorted(ckpt.state_dict) == sorted(state)
    assert ckpt.state_dict["cls_token"].shape == (1, 1, 64)
    assert ckpt.state_dict["pos_embed"].shape == (1, 17, 64)


@pytest.mark.parametrize("container", ["torch_save", "torchscript"])
def test_openai_layout_lands_exactly_in_the_vit(cfg, tmp_path, container):
    state = random_vit_state(cfg)
    path = tmp_path / "ViT-tiny.pt"
    if container == "torch_save":
        torch.save(timm_to_openai(state), path)
    else:  # how OpenAI released its CLIP weights
        save_torchscript(timm_to_openai(state), path)
    model = build_model(cfg)

    load_vision_weights(model.vision, path)

    assert_vit_holds(model, state)


def test_position_embeddings_at_the_model_grid_are_carried_unchanged(cfg, tmp_path):
    state = random_vit_state(cfg)  # image_size 64, patch 16: the model's 4x4 grid
    save_file(state, tmp_path / "vit.safetensors")
    model = build_model(cfg)

    load_vision_weights(model.vision, tmp_path / "vit.safetensors")

    assert torch.equal(model.vision.vit.pos_embed, state["pos_embed"])


def test_position_embeddings_of_another_grid_are_resized_bilinearly_keeping_cls(cfg, tmp_path):
    state = random_vit_state(cfg, image_size=32)  # a 2x2 grid; the model has 4x4
    save_file(state, tmp_path / "vit.safetensors")
    model = build_model(cfg)

    load_vision_weights(model.vision, tmp_path / "vit.safetensors")

    old, new = state["pos_embed"][0], model.vision.vit.pos_embed[0]  # (1 + 4, D), (1 + 16, D)
    assert new.shape == (17, 64)
    assert torch.equal(new[0], old[0])  # [CLS]
    # Bilinear 2x2 -> 4x4 (half-pixel centres): corners copy the old corners; the second cell of the
    # first row samples x = 0.25 between the first two old cells.
    assert torch.allclose(new[1], old[1])
    assert torch.allclose(new[16], old[4])
    assert torch.allclose(new[2], 0.75 * old[1] + 0.25 * old[2], atol=1e-6)


def test_vit_of_another_width_raises_naming_the_key_and_the_sizes(cfg, tmp_path):
    save_file(random_vit_state(cfg, width=96), tmp_path / "vit.safetensors")
    model = build_model(cfg)

    expected = r"cls_token is \(1, 1, 96\) in the checkpoint but \(1, 1, 64\) in the model"
    with pytest.raises(ValueError, match=expected) as err:
        load_vision_weights(model.vision, tmp_path / "vit.safetensors")
    assert "width=96, patch_size=16" in str(err.value)


def test_vit_of_another_depth_raises_listing_missing_tensors(cfg, tmp_path):
    save_file(random_vit_state(cfg, depth=1), tmp_path / "vit.safetensors")
    model = build_model(cfg)

    with pytest.raises(ValueError, match=r"12 model tensors missing \(blocks\.1\.norm1\.weight") as err:
        load_vision_weights(model.vision, tmp_path / "vit.safetensors")
    assert "depth=1" in str(err.value)


def test_checkpoint_that_is_not_a_clip_vit_raises(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")

    with pytest.raises(ValueError, match="is not a CLIP ViT checkpoint.*Keys seen: conv.weight"):
        read_clip_state_dict(tmp_path / "other.pth")


# --- text -------------------------------------------------------------------------------------


def write_bert(cfg, directory, layers: int = 5, **sizes) -> BertForMaskedLM:
    """A tiny BERT with every tensor random, saved like a Hugging Face BERT directory."""
    text = cfg.text
    torch.manual_seed(2)
    config = dict(vocab_size=text.vocab_size, hidden_size=text.width, num_attention_heads=text.heads,
                  intermediate_size=text.intermediate, max_position_embeddings=text.max_positions)
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=layers, **{**config, **sizes}))
    with torch.no_grad():
        for p in bert.parameters():
            p.normal_()
    bert.save_pretrained(directory)
    return bert


@pytest.fixture(scope="module")
def loaded(cfg, tmp_path_factory):
    """A tiny model (2 encoder + 3 fusion + 2 decoder layers) loaded from a 5-layer BERT."""
    directory = tmp_path_factory.mktemp("bert")
    bert = write_bert(cfg, directory)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_bert_weights(model, directory)
    return model, bert, before, report


def assert_same(module: nn.Module, source: nn.Module) -> None:
    ours, theirs = module.state_dict(), source.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_bert_embeddings_initialise_text_encoder_and_decoder_embeddings(loaded):
    model, bert, _, _ = loaded
    assert_same(model.text_encoder.embeddings, bert.bert.embeddings)
    assert_same(model.decoder.embeddings, bert.bert.embeddings)


@pytest.mark.parametrize("i", [0, 1])
def test_bert_layer_i_initialises_text_encoder_layer_i(loaded, i):
    model, bert, _, _ = loaded
    assert_same(model.text_encoder.layers[i], bert.bert.encoder.layer[i])


@pytest.mark.parametrize("j", [0, 1, 2])
def test_bert_layer_e_plus_j_initialises_fusion_layer_j(loaded, j):
    model, bert, _, _ = loaded
    layer, source = model.fusion.layers[j], bert.bert.encoder.layer[2 + j]  # E = 2
    for part in ("attention", "intermediate", "output"):
        assert_same(getattr(layer, part), getattr(source, part))


@pytest.mark.parametrize("k", [0, 1])
def test_bert_layer_k_initialises_decoder_layer_k_but_not_its_cross_attention(loaded, k):
    model, bert, before, _ = loaded
    layer, source = model.decoder.layers[k], bert.bert.encoder.layer[k]
    for part in ("attention", "intermediate", "output"):
        assert_same(getattr(layer, part), getattr(source, part))
    for key, value in layer.crossattention.state_dict().items():
        assert torch.equal(value, before[f"decoder.layers.{k}.crossattention.{key}"]), key


def test_fusion_cross_attention_keeps_its_initialisation(loaded):
    model, _, before, _ = loaded
    for key, value in model.state_dict().items():
        if key.startswith("fusion.") and ".crossattention." in key:
            assert torch.equal(value, before[key]), key


def test_bert_mlm_transform_and_bias_initialise_both_mlm_heads(loaded):
    model, bert, _, _ = loaded
    source = bert.cls.predictions
    for head in (model.mlm_head.head.predictions, model.decoder.lm_head.head.predictions):
        assert_same(head.transform, source.transform)
        assert torch.equal(head.bias, source.bias)
    words = bert.bert.embeddings.word_embeddings.weight  # the output matrices stay tied to these
    assert torch.equal(model.mlm_head.head.predictions.decoder.weight, words)
    assert torch.equal(model.decoder.lm_head.head.predictions.decoder.weight, words)


def test_report_names_where_bert_tensors_went_and_what_stays_new(loaded):
    model, _, _, report = loaded
    copied = report.copied
    assert copied["fusion.layers.2.attention.self.query.weight"] == "encoder.layer.4.attention.self.query.weight"
    assert copied["decoder.layers.1.output.dense.bias"] == "encoder.layer.1.output.dense.bias"
    assert copied["mlm_head.head.predictions.transform.dense.weight"] == "cls.predictions.transform.dense.weight"
    online = [name for name, _ in model.named_parameters() if not name.startswith("momentum.")]
    cross = [name for name in online if ".crossattention." in name]
    assert sorted(report.new) == sorted(cross)  # fusion layers 0-1 and decoder layers 0-1
    assert report.unused == []


def test_bert_weights_without_the_bert_prefix_load(cfg, tmp_path):
    bert = write_bert(cfg, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    unprefixed = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    torch.save(unprefixed, tmp_path / "pytorch_model.bin")
    model = build_model(cfg)

    load_bert_weights(model, tmp_path)

    assert_same(model.fusion.layers[2].attention, bert.bert.encoder.layer[4].attention)


def test_too_shallow_bert_raises(cfg, tmp_path):
    write_bert(cfg, tmp_path, layers=4)  # the model needs 2 encoder + 3 fusion = 5
    model = build_model(cfg)

    expected = r"fusion layer 2 is initialised from BERT layer 4, but .* has only 4 layers"
    with pytest.raises(ValueError, match=expected):
        load_bert_weights(model, tmp_path)


def test_bert_of_another_width_raises_with_both_sizes(cfg, tmp_path):
    write_bert(cfg, tmp_path, hidden_size=32)
    model = build_model(cfg)

    with pytest.raises(ValueError, match=r"hidden_size=32 where the model has text.width=64"):
        load_bert_weights(model, tmp_path)


def test_momentum_copies_equal_the_online_weights_after_loading(cfg, tmp_path):
    save_file(random_vit_state(cfg), tmp_path / "vit.safetensors")
    write_bert(cfg, tmp_path / "bert")
    model_cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, weights=str(tmp_path / "vit.safetensors")),
        text=dataclasses.replace(cfg.text, weights=str(tmp_path / "bert")),
    )
    model = build_model(model_cfg)

    parts = load_pretrained_parts(model, model_cfg)

    assert parts.vision is not None and parts.text is not None
    for name in MOMENTUM_MODULES:
        online, copy = getattr(model, name).state_dict(), model.momentum[name].state_dict()
        for key in online:
            assert torch.equal(copy[key], online[key]), f"{name}.{key}"


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_loads_from_a_local_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")

    tokenizer = load_tokenizer(tmp_path)

    assert tokenizer("a photo of cats")["input_ids"] == [2, 5, 6, 7, 8, 9, 3]


def test_tokenizer_directory_without_vocab_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("")

    expected = r"has no vocab.txt or tokenizer.json \(it holds: notes.txt\)"
    with pytest.raises(FileNotFoundError, match=expected):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")


def test_building_from_a_config_loads_the_weights_it_names(cfg, tmp_path):
    state = random_vit_state(cfg)
    save_file(state, tmp_path / "vit.safetensors")
    vision = dataclasses.replace(cfg.vision, weights=str(tmp_path / "vit.safetensors"))

    model = build_mplug(dataclasses.replace(cfg, vision=vision))

    assert_vit_holds(model, state)
    assert torch.equal(model.momentum.vision.vit.pos_embed, state["pos_embed"])
