"""Importing official mPLUG checkpoints (`mplug import official`).

Full-size checkpoints are built from the official key lists (tests/data/official_keys, copied from the
official models' state dicts) with every float tensor a distinct window of one random pool, so nothing
full-size is allocated: a tensor landing anywhere but its place, or reshaped wrongly, compares unequal.
The package path runs end to end on the tiny preset, from a tiny model written out in the official layout.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.official_checkpoint import (
    REPORT_FILE,
    OfficialCheckpointError,
    convert_official,
)
from pretrain.package import layout_of_config

KEY_LISTS = Path(__file__).parent / "data" / "official_keys"
POOL_SIZE = 40 * 2**20  # floats: more than the largest official tensor (CLIP-L's 49408 x 768 token embeddings)
WINDOW_STEP = 7919  # a prime: tensor i starts at i * step (mod the room left), so no two windows coincide
QUEUE_SIZE = 65536
FUSION_START = 6  # the official fusion stack has 12 layers and runs the last 6
TEXT_ENCODER_HEADS = ("text_encoder.", "text_encoder_m.")
FUSION_HEADS = ("fusion_encoder.", "fusion_encoder_m.")

_POOL = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(0))


def read_key_list(name: str) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype) of one official key list."""
    entries = {}
    with gzip.open(KEY_LISTS / f"KEYS_{name}.txt.gz", "rt") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            entries[key] = ([int(n) for n in re.findall(r"\d+", shape)], dtype)
    return entries


def window(index: int, shape: list[int]) -> torch.Tensor:
    numel = int(torch.tensor(shape).prod()) if shape else 1
    start = (index * WINDOW_STEP) % (POOL_SIZE - numel + 1)
    return _POOL[start : start + numel].view(shape)


def official_state(entries: dict[str, tuple[list[int], str]]) -> dict[str, torch.Tensor]:
    """An official state dict of the listed shapes: float tensors are pool windows, ties as the official model's."""
    state = {}
    for index, (key, (shape, dtype)) in enumerate(entries.items()):
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape)
        elif key == "idx_queue":
            state[key] = torch.arange(shape[-1]).reshape(shape)
        elif key == "queue_ptr":
            state[key] = torch.tensor([4096])
        elif key == "temp":
            state[key] = torch.tensor(0.05)
        else:
            assert dtype == "float32", key
            state[key] = window(index, shape)
    for decoder in ("text_decoder", "text_decoder_m"):  # BertLMHeadModel's ties
        if f"{decoder}.cls.predictions.bias" in state:
            state[f"{decoder}.cls.predictions.decoder.weight"] = state[f"{decoder}.bert.embeddings.word_embeddings.weight"]
            state[f"{decoder}.cls.predictions.decoder.bias"] = state[f"{decoder}.cls.predictions.bias"]
    return state


def pretraining_state(size: str) -> dict[str, torch.Tensor]:
    """A pretraining checkpoint: the VQA model's modules and the retrieval heads, with the pretraining naming
    (text_encoder.bert.*, fusion_encoder.fusion.*) and the MLM head beside the fusion module."""
    state = official_state({**read_key_list(f"retrieval_{size}"), **read_key_list(f"vqa_{size}")})
    renamed = {}
    for key, value in state.items():
        for head, inner in ((TEXT_ENCODER_HEADS, "bert."), (FUSION_HEADS, "fusion.")):
            module = next((h for h in head if key.startswith(h)), None)
            if module is not None:
                key = module + inner + key[len(module):]
        renamed[key] = value
    for module, words in (("fusion_encoder", "text_encoder"), ("fusion_encoder_m", "text_encoder_m")):
        head = {k.replace("text_decoder.", f"{module}."): v for k, v in state.items()
                if k.startswith("text_decoder.cls.predictions.")}
        head = {k: v + 1.0 for k, v in head.items()}  # its own values, not the decoder's
        head[f"{module}.cls.predictions.decoder.weight"] = renamed[f"{words}.bert.embeddings.word_embeddings.weight"]
        head[f"{module}.cls.predictions.decoder.bias"] = head[f"{module}.cls.predictions.bias"]
        renamed.update(head)
    return renamed


VARIANTS = [("base", "vqa"), ("base", "retrieval"), ("large", "vqa"), ("large", "retrieval"),
            ("base", "pretraining"), ("large", "pretraining")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{s}-{m}" for s, m in VARIANTS])
def imported(request):
    size, model = request.param
    state = pretraining_state(size) if model == "pretraining" else official_state(read_key_list(f"{model}_{size}"))
    return size, model, state, convert_official(state, load_config(size), config_name=size)


def official_key(state: dict, key: str) -> str:
    """`key` in the checkpoint's naming (the pretraining one nests the BERT parts one level deeper)."""
    if key in state:
        return key
    for heads, inner in ((TEXT_ENCODER_HEADS, "bert."), (FUSION_HEADS, "fusion.")):
        for head in heads:
            if key.startswith(head):
                return head + inner + key[len(head):]
    raise KeyError(key)


def assert_lands(converted, state, ours: str, official: str) -> None:
    official = official_key(state, official)
    assert converted.sources[ours] == official
    assert torch.equal(converted.state_dict[ours], state[official].reshape(converted.state_dict[ours].shape))


# ---------------------------------------------------------------------------------------------
# Full-size key lists, in memory


def test_every_official_tensor_is_mapped_tied_queued_or_dropped_with_a_reason(imported):
    _, _, state, converted = imported
    mapped = set(converted.sources.values())
    queued = {"image_queue", "text_queue", "idx_queue", "queue_ptr"} & set(state)
    parts = [mapped, set(converted.tied), queued, set(converted.dropped)]
    assert sum(len(part) for part in parts) == len(state)  # disjoint ...
    assert set().union(*parts) == set(state)  # ... and complete
    assert all(reason for reason in converted.dropped.values())


def test_every_mapped_tensor_has_the_official_values_at_the_models_shape(imported):
    size, _, state, converted = imported
    layout = layout_of_config(converted.config, momentum=converted.momentum)
    for ours, official in converted.sources.items():
        assert tuple(converted.state_dict[ours].shape) == tuple(layout.shapes[ours]), ours
        assert torch.equal(converted.state_dict[ours].flatten(), state[official].flatten()), ours


def test_the_detected_official_model_and_naming(imported):
    _, model, _, converted = imported
    assert converted.model == model
    assert converted.naming == ("pretraining" if model == "pretraining" else "task")
    assert converted.momentum


def test_official_fusion_layers_6_to_11_become_layers_0_to_5(imported):
    _, _, state, converted = imported
    if "fusion.layers.0.attention.self.query.weight" not in converted.sources:
        pytest.skip("no fusion module")
    for j in range(6):
        for part in ("attention.self.query.weight", "attention.output.LayerNorm.bias", "output.dense.weight"):
            assert_lands(converted, state, f"fusion.layers.{j}.{part}",
                         f"fusion_encoder.encoder.layer.{FUSION_START + j}.{part}")
            assert_lands(converted, state, f"momentum.fusion.layers.{j}.{part}",
                         f"fusion_encoder_m.encoder.layer.{FUSION_START + j}.{part}")


def test_fusion_layers_that_never_run_and_the_fusion_embeddings_are_dropped(imported):
    _, _, state, converted = imported
    for i in range(FUSION_START):
        key = official_key(state, f"fusion_encoder.encoder.layer.{i}.attention.self.query.weight")
        assert "never run" in converted.dropped[key]
    assert "never run" in converted.dropped[official_key(state, "fusion_encoder.embeddings.word_embeddings.weight")]


def test_connected_layer_cross_attention_is_dropped_only_in_the_base_model(imported):
    size, _, state, converted = imported
    key = official_key(state, f"fusion_encoder.encoder.layer.{FUSION_START + 3}.crossattention.self.query.weight")
    if size == "base":  # stride 3: layer 3 is connected and has no cross-attention
        assert "connected-attention" in converted.dropped[key]
        assert "fusion.layers.3.crossattention.self.query.weight" not in converted.state_dict
    else:  # stride 6: every layer runs its cross-attention
        assert_lands(converted, state, "fusion.layers.3.crossattention.self.query.weight", key)


def test_text_encoder_layers_and_embeddings_keep_their_indices(imported):
    _, _, state, converted = imported
    for i in range(6):
        assert_lands(converted, state, f"text_encoder.layers.{i}.intermediate.dense.weight",
                     f"text_encoder.encoder.layer.{i}.intermediate.dense.weight")
    assert_lands(converted, state, "text_encoder.embeddings.word_embeddings.weight",
                 "text_encoder.embeddings.word_embeddings.weight")
    assert_lands(converted, state, "momentum.text_encoder.layers.5.output.dense.bias",
                 "text_encoder_m.encoder.layer.5.output.dense.bias")
    assert converted.dropped[official_key(state, "text_encoder.embeddings.position_ids")].startswith("position-id")


def test_clip_vision_tower_lands_under_timm_names_with_in_proj_kept_fused(imported):
    size, _, state, converted = imported
    width = 768 if size == "base" else 1024
    assert_lands(converted, state, "vision.vit.blocks.0.attn.qkv.weight",
                 "visual_encoder.visual.transformer.resblocks.0.attn.in_proj_weight")
    assert converted.state_dict["vision.vit.blocks.0.attn.qkv.weight"].shape == (3 * width, width)
    assert_lands(converted, state, "vision.vit.blocks.1.mlp.fc2.bias", "visual_encoder.visual.transformer.resblocks.1.mlp.c_proj.bias")
    assert_lands(converted, state, "vision.vit.patch_embed.proj.weight", "visual_encoder.visual.conv1.weight")
    assert_lands(converted, state, "vision.vit.norm_pre.weight", "visual_encoder.visual.ln_pre.weight")
    assert_lands(converted, state, "vision.vit.norm.bias", "visual_encoder.visual.ln_post.bias")
    assert_lands(converted, state, "vision.vit.cls_token", "visual_encoder.visual.class_embedding")
    assert converted.state_dict["vision.vit.cls_token"].shape == (1, 1, width)
    assert_lands(converted, state, "vision.vit.pos_embed", "visual_encoder.visual.positional_embedding")
    assert converted.state_dict["vision.vit.pos_embed"].shape == (1, 257, width)
    assert_lands(converted, state, "momentum.vision.vit.blocks.3.norm1.weight",
                 "visual_encoder_m.visual.transformer.resblocks.3.ln_1.weight")
    assert converted.config.model.vision.image_size == (256 if size == "base" else 224)  # 16 x 16 patches


def test_clip_text_tower_and_image_projection_are_dropped(imported):
    _, _, _, converted = imported
    assert "text tower" in converted.dropped["visual_encoder.token_embedding.weight"]
    assert "text tower" in converted.dropped["visual_encoder.transformer.resblocks.0.attn.in_proj_weight"]
    assert "text tower" in converted.dropped["visual_encoder_m.logit_scale"]
    assert "projection" in converted.dropped["visual_encoder.visual.proj"]


def test_large_vision_projection_lands_in_the_vision_bridge(imported):
    size, _, state, converted = imported
    if size != "large":
        assert "visn_fc.weight" not in state
        return
    assert_lands(converted, state, "vision.proj.0.weight", "visn_fc.weight")
    assert_lands(converted, state, "vision.proj.1.bias", "visn_layer_norm.bias")
    assert_lands(converted, state, "momentum.vision.proj.0.bias", "visn_fc_m.bias")


def test_decoder_layers_and_lm_head_land_with_the_output_matrix_tied(imported):
    _, model, state, converted = imported
    if model == "retrieval":
        assert not any(name.startswith("decoder.") for name in converted.state_dict)
        return
    assert_lands(converted, state, "decoder.layers.11.crossattention.self.key.weight",
                 "text_decoder.bert.encoder.layer.11.crossattention.self.key.weight")
    assert_lands(converted, state, "decoder.lm_head.head.predictions.transform.dense.weight",
                 "text_decoder.cls.predictions.transform.dense.weight")
    assert_lands(converted, state, "decoder.lm_head.head.predictions.bias", "text_decoder.cls.predictions.bias")
    assert converted.tied["text_decoder.cls.predictions.decoder.weight"] == \
        "text_decoder.bert.embeddings.word_embeddings.weight"
    assert converted.tied["text_decoder.cls.predictions.decoder.bias"] == "text_decoder.cls.predictions.bias"
    assert "momentum decoder" in converted.dropped["text_decoder_m.bert.encoder.layer.0.attention.self.query.weight"]


def test_retrieval_heads_temperature_and_queue_are_kept(imported):
    _, model, state, converted = imported
    if model == "vqa":
        assert not converted.queue
        return
    assert_lands(converted, state, "itm_head.weight", "itm_head.weight")
    assert_lands(converted, state, "momentum.vision_proj.bias", "vision_proj_m.bias")
    assert converted.state_dict["temp"].tolist() == [pytest.approx(0.05)]
    queue = converted.queue
    assert torch.equal(queue["image"], state["image_queue"]) and torch.equal(queue["text"], state["text_queue"])
    assert queue["ids"].shape == (QUEUE_SIZE,) and torch.equal(queue["ids"], state["idx_queue"][0])
    assert int(queue["ptr"]) == 4096 and int(queue["filled"]) == QUEUE_SIZE
    assert converted.config.model.queue_size == QUEUE_SIZE


def test_tensors_the_checkpoint_lacks_are_listed_as_new(imported):
    _, model, _, converted = imported
    modules = {name.removeprefix("momentum.").split(".")[0] for name in converted.missing}
    expected = {"vqa": {"vision_proj", "text_proj", "itm_head", "mlm_head", "temp"},
                "retrieval": {"decoder", "mlm_head"}, "pretraining": set()}[model]
    assert modules == expected


def test_pretraining_mlm_head_lands_in_the_mlm_head(imported):
    _, model, state, converted = imported
    if model != "pretraining":
        return
    assert_lands(converted, state, "mlm_head.head.predictions.transform.dense.weight",
                 "fusion_encoder.cls.predictions.transform.dense.weight")
    assert_lands(converted, state, "momentum.mlm_head.head.predictions.bias", "fusion_encoder_m.cls.predictions.bias")
    # tied to the text encoder's word embeddings in the test checkpoint, as in this model
    assert converted.tied["fusion_encoder.cls.predictions.decoder.weight"] == \
        "text_encoder.bert.embeddings.word_embeddings.weight"


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit


@pytest.fixture(scope="module")
def vqa_base():
    return official_state(read_key_list("vqa_base"))


def test_large_checkpoint_with_the_base_config_names_the_sizes_and_the_config_that_fits():
    state = official_state(read_key_list("vqa_large"))
    with pytest.raises(OfficialCheckpointError, match=r"width=1024.*use --config large"):
        convert_official(state, load_config("base"), config_name="base")


def test_mlm_output_matrix_of_other_word_embeddings_is_dropped_with_the_difference():
    state = pretraining_state("base")
    state["fusion_encoder.cls.predictions.decoder.weight"] = state["fusion_encoder.cls.predictions.decoder.weight"] + 1
    converted = convert_official(state, load_config("base"), config_name="base")
    reason = converted.dropped["fusion_encoder.cls.predictions.decoder.weight"]
    assert "fusion module's own word embeddings" in reason and "max abs difference 1" in reason


def test_untied_decoder_output_matrix_is_refused(vqa_base):
    state = dict(vqa_base, **{"text_decoder.cls.predictions.decoder.weight":
                              vqa_base["text_decoder.cls.predictions.decoder.weight"] * 2})
    with pytest.raises(OfficialCheckpointError, match="must equal text_decoder.bert.embeddings.word_embeddings"):
        convert_official(state, load_config("base"), config_name="base")


def test_a_key_no_rule_knows_is_refused_by_name(vqa_base):
    state = dict(vqa_base, **{"bbox_head.weight": torch.zeros(4, 768)})
    with pytest.raises(OfficialCheckpointError, match="'bbox_head.weight'"):
        convert_official(state, load_config("base"), config_name="base")


def test_a_shape_mismatch_names_the_key_both_shapes_and_the_fitting_config(vqa_base):
    config = load_config("base", ["model.text.intermediate=2048"])
    with pytest.raises(OfficialCheckpointError, match=r"text_encoder.encoder.layer.0.intermediate.dense.weight is "
                                                      r"\(3072, 768\) but .* is \(2048, 768\); config 'base'"):
        convert_official(vqa_base, config, config_name="base")


def test_a_text_encoder_of_another_depth_names_the_setting(vqa_base):
    with pytest.raises(OfficialCheckpointError, match="text_encoder has 6 layers but config 'base' has model.text.encoder_layers=4; set it to 6"):
        convert_official(vqa_base, load_config("base", ["model.text.encoder_layers=4"]), config_name="base")


def test_an_explicit_task_must_fit_the_checkpoint(vqa_base):
    with pytest.raises(OfficialCheckpointError, match="modules of the official vqa model"):
        convert_official(vqa_base, load_config("base"), config_name="base", model="retrieval")
    assert convert_official(vqa_base, load_config("base"), config_name="base", model="caption").model == "caption"


# ---------------------------------------------------------------------------------------------
# End to end on the tiny preset: official layout -> package -> the same outputs

TIMM_TO_OPENAI = (  # timm name prefix -> OpenAI CLIP's, below `visual.`
    ("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."), ("norm.", "ln_post."),
)
TIMM_BLOCK_TO_OPENAI = (
    ("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."), ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
)
NEVER_RUN = 2  # fusion layers in front of the ones that run, as the official 12-layer stack has 6


def as_official(model, *, retrieval: bool) -> dict[str, torch.Tensor]:
    """The tiny model's weights written the way the official code names them (the test's own inverse map)."""
    state = {}
    for momentum, prefix in ((False, ""), (True, "momentum.")):
        suffix = "_m" if momentum else ""
        own = {k[len(prefix):]: v.clone() for k, v in model.state_dict().items()
               if k.startswith(prefix) and (momentum or not k.startswith("momentum."))}
        for name, value in own.items():
            if name.startswith("vision.vit."):
                rest = name[len("vision.vit."):]
                if rest == "cls_token":
                    rest, value = "class_embedding", value.reshape(-1)
                elif rest == "pos_embed":
                    rest, value = "positional_embedding", value[0]
                elif rest.startswith("blocks."):
                    index, part = rest[len("blocks."):].split(".", 1)
                    part = next(new + part[len(old):] for old, new in TIMM_BLOCK_TO_OPENAI if part.startswith(old))
                    rest = f"transformer.resblocks.{index}.{part}"
                else:
                    rest = next(new + rest[len(old):] for old, new in TIMM_TO_OPENAI if rest.startswith(old))
                state[f"visual_encoder{suffix}.visual.{rest}"] = value
            elif name.startswith("text_encoder."):
                rest = name[len("text_encoder."):].replace("layers.", "encoder.layer.", 1)
                state[f"text_encoder{suffix}.{rest}"] = value
            elif name.startswith("fusion.layers."):
                index, part = name[len("fusion.layers."):].split(".", 1)
                state[f"fusion_encoder{suffix}.encoder.layer.{int(index) + NEVER_RUN}.{part}"] = value
            elif name.startswith("decoder.") and not retrieval and not momentum:
                rest = name[len("decoder."):]
                rest = rest.replace("lm_head.head.", "cls.", 1) if rest.startswith("lm_head.") else "bert." + rest
                state[f"text_decoder.{rest.replace('bert.layers.', 'bert.encoder.layer.')}"] = value
            elif name.split(".")[0] in ("vision_proj", "text_proj", "itm_head") and retrieval:
                state[f"{name.split('.')[0]}{suffix}.{name.split('.', 1)[1]}"] = value
    width = model.cfg.text.width
    state["visual_encoder.visual.proj"] = torch.randn(width, 8)  # CLIP's projection and text tower: unused
    state["visual_encoder.token_embedding.weight"] = torch.randn(50, 8)
    for i in range(NEVER_RUN):
        state[f"fusion_encoder.encoder.layer.{i}.attention.self.query.weight"] = torch.randn(width, width)
    connected = model.fusion.pattern.index("connected") + NEVER_RUN
    state[f"fusion_encoder.encoder.layer.{connected}.crossattention.self.query.weight"] = torch.randn(width, width)
    if retrieval:
        state["temp"] = model.temp.detach().reshape(())
        queue = model.cfg.queue_size
        state["image_queue"] = torch.nn.functional.normalize(torch.randn(model.cfg.embed_dim, queue), dim=0)
        state["text_queue"] = torch.nn.functional.normalize(torch.randn(model.cfg.embed_dim, queue), dim=0)
        state["idx_queue"] = torch.full((1, queue), -100)
        state["queue_ptr"] = torch.tensor([8])
    else:  # the VQA model's momentum decoder
        state["text_decoder_m.bert.embeddings.LayerNorm.weight"] = torch.ones(width)
    return state


@pytest.fixture(scope="module")
def tiny_source(tokenizer):
    from pretrain.config.tokens import with_tokenizer
    from pretrain.models.mplug import MPLUG

    config = with_tokenizer(load_config("tiny"), tokenizer)
    torch.manual_seed(5)
    return config, MPLUG(config.model, momentum=True).eval()


def write_official(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"model": state, "epoch": 3}, path)
    return path


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_imported_tiny_package_gives_the_source_models_outputs(tmp_path, tokenizer, tiny_source, pair_batch, task):
    from finetune.official_tasks import import_official
    from finetune.predict import load_task_package
    from pretrain.models.mplug import image_feature, text_feature
    from pretrain.package import load_package, read_package_info

    config, source = tiny_source
    checkpoint = write_official(tmp_path / f"{task}.pth", as_official(source, retrieval=task == "retrieval"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    package = import_official(checkpoint, "tiny", tmp_path / "package", str(tmp_path / "tok"))
    assert read_package_info(package).extra["task"] == task
    # predict serves VQA; a retrieval task model needs its momentum copies, which load_task_package skips
    model = load_task_package(package).model if task == "vqa" else load_package(package, momentum=True).model
    images, ids, mask = pair_batch["images"], pair_batch["input_ids"], pair_batch["attention_mask"]
    with torch.no_grad():
        for ours in (source, model):
            ours.eval()
        vision = [m.encode_image(images) for m in (source, model)]
        text = [m.encode_text(ids, mask) for m in (source, model)]
        fused = [m.fuse(t, mask, v) for m, t, v in zip((source, model), text, vision, strict=True)]
        torch.testing.assert_close(vision[1], vision[0], rtol=0, atol=0)
        torch.testing.assert_close(fused[1].joint(), fused[0].joint(), rtol=0, atol=0)
        if task == "vqa":
            memory_mask = torch.cat([torch.ones(vision[0].shape[:2], dtype=torch.long), mask], 1)
            logits = [m.decode(ids, mask, f.joint(), memory_mask) for m, f in zip((source, model), fused, strict=True)]
            torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
        else:
            torch.testing.assert_close(image_feature(model, vision[1]), image_feature(source, vision[0]), rtol=0, atol=0)
            torch.testing.assert_close(text_feature(model, text[1]), text_feature(source, text[0]), rtol=0, atol=0)
            torch.testing.assert_close(model.itm_head(fused[1].text[:, 0]), source.itm_head(fused[0].text[:, 0]))
    assert (package / REPORT_FILE).is_file()


def test_imported_retrieval_package_keeps_the_queue_and_momentum_copies(tmp_path, tokenizer, tiny_source):
    from finetune.official_tasks import import_official
    from pretrain.package import load_package, read_itc_queue, read_package_info

    config, source = tiny_source
    state = as_official(source, retrieval=True)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    package = import_official(write_official(tmp_path / "r.pth", state), "tiny", tmp_path / "p", str(tmp_path / "tok"))
    queue = read_itc_queue(package)
    assert torch.equal(queue["image"], state["image_queue"]) and int(queue["ptr"]) == 8
    info = read_package_info(package)
    assert info.extra["task"] == "retrieval" and info.extra["task_settings"]["k_test"] == 256
    assert info.extra["official"]["model"] == "retrieval"
    loaded = load_package(package, momentum=True).model
    for name, value in source.momentum.state_dict().items():
        if name.split(".")[0] in ("vision", "text_encoder", "fusion", "vision_proj", "text_proj"):
            assert torch.equal(loaded.momentum.state_dict()[name], value), name


def test_imported_caption_package_reads_no_prompt_as_the_official_recipe(tmp_path, tokenizer, tiny_source, pair_batch):
    from cluster.cli import main
    from finetune.predict import load_task_package
    from pretrain.package import read_package_info

    _, source = tiny_source
    state = as_official(source, retrieval=False)
    del state["text_decoder_m.bert.embeddings.LayerNorm.weight"]  # the caption model keeps no momentum copies
    state = {k: v for k, v in state.items() if "_m." not in k}
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    code = main(["import", "official", str(write_official(tmp_path / "c.pth", state)), "--config", "tiny",
                 "--output", str(tmp_path / "caption"), "--tokenizer", str(tmp_path / "tok")])
    assert code == 0
    extra = read_package_info(tmp_path / "caption").extra
    assert extra["task"] == "caption" and extra["task_settings"]["prompt"] == ""
    task = load_task_package(tmp_path / "caption")
    assert task.prompt_ids.numel() == 0
    with torch.no_grad():
        assert len(task.generate(pair_batch["images"][:1])) == 1  # decodes straight after [CLS]


def test_modelscope_copies_with_every_key_under_model_are_read(vqa_base):
    converted = convert_official({"model." + key: value for key, value in vqa_base.items()}, load_config("base"),
                                 config_name="base")
    assert converted.sources["fusion.layers.0.attention.self.query.weight"] == \
        "fusion_encoder.encoder.layer.6.attention.self.query.weight"


def test_package_side_files_may_not_replace_a_part_of_the_package(tmp_path, tokenizer, tiny_source):
    from pretrain.package import PackageError, export_package

    config, source = tiny_source
    with pytest.raises(PackageError, match=r"side files \['model.safetensors'\] would replace a part"):
        export_package(tmp_path / "p", source, config, tokenizer, files={"model.safetensors": b""})
