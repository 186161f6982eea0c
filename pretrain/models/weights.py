"""Pretrained parts from local files: a CLIP ViT into the vision encoder, a BERT into the text
encoder, the fusion and the decoder, and the BERT tokenizer. Nothing is ever downloaded.

Vision: a timm ViT state dict or an OpenAI CLIP checkpoint (TorchScript archives included), renamed
to timm's names; CLIP's text tower and output projection are unused and dropped.

Text, with E text-encoder layers (the official mPLUG initialisation):

    BERT embeddings  -> text_encoder.embeddings and decoder.embeddings
    BERT layer i     -> text_encoder.layers.i                      i = 0..E-1
    BERT layer E + j -> fusion.layers.j  (cross-attention stays new)
    BERT layer k     -> decoder.layers.k (cross-attention stays new)
    cls.predictions  -> mlm_head and decoder.lm_head (transform and output bias; the output matrix is
                        tied to the word embeddings)

mPLUG-2 (a model with universal layers) uses the whole BERT as its text encoder, so its F fusion
layers start from the BERT's last F layers, as in the released mPLUG-2 code: BERT layer
depth - F + j -> fusion.layers.j. The universal layers' latents and cross-attentions stay new.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertTokenizerFast

from pretrain.config.schema import ModelConfig, TextConfig
from pretrain.models.mplug import MPLUG
from pretrain.models.vision import VisionEncoder, resize_position_embedding

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Training checkpoints keep the weights one or more levels down under one of these keys.
NESTING_KEYS = ("state_dict", "model", "module")
WRAPPER_PREFIX = "module."  # DistributedDataParallel's

# OpenAI CLIP's visual names (below the prefix that holds `class_embedding`) -> timm's.
OPENAI_RENAMES = (
    ("conv1.", "patch_embed.proj."),
    ("ln_pre.", "norm_pre."),
    ("ln_post.", "norm."),
)
OPENAI_BLOCKS = "transformer.resblocks."
OPENAI_BLOCK_RENAMES = (
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
OPENAI_MARKER = "class_embedding"
TIMM_MARKER = "patch_embed.proj.weight"
# CLIP's image->joint-space projection: `proj` in OpenAI's layout, `head` in timm's. mPLUG uses the
# tokens after the final LayerNorm instead.
CLIP_PROJECTION = {"openai": ("proj",), "timm": ("head.",)}

BERT_PREFIX = "bert."
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Old TensorFlow-converted BERT checkpoints name the LayerNorm parameters gamma and beta.
LEGACY_NORM_NAMES = ((".gamma", ".weight"), (".beta", ".bias"))
TEXT_MODULES = ("text_encoder", "universal", "fusion", "decoder", "mlm_head")  # universal: all new
MLM_HEADS = ("decoder.lm_head.head.predictions.", "mlm_head.head.predictions.")
# BertConfig field -> TextConfig field that must agree.
BERT_CONFIG_FIELDS = {
    "hidden_size": "width",
    "num_attention_heads": "heads",
    "vocab_size": "vocab_size",
    "intermediate_size": "intermediate",
    "max_position_embeddings": "max_positions",
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
PREVIEW = 8  # names shown in messages before "..."


def preview(names: Sequence[str], limit: int = PREVIEW) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Reading state dicts


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP releases) are zips holding compiled code and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors`, `torch.save` or TorchScript file, on the CPU.

    Weights nested under 'state_dict', 'model' or 'module' are found, and DistributedDataParallel's
    'module.' prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; expected a local state dict "
                                "(.safetensors, .pth, .bin or an OpenAI CLIP .pt archive)")
    if path.suffix == ".safetensors":
        obj = load_file(path)
    elif is_torchscript_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds Python objects besides tensors and is not read, for safety ({exc}); "
                "re-save only its weights with torch.save(state_dict, path) or as .safetensors"
            ) from exc
    while isinstance(obj, Mapping):
        inner = next((obj[key] for key in NESTING_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = inner
    items = obj.items() if isinstance(obj, Mapping) else ()
    tensors = {key: value for key, value in items if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors at the top level nor under any of "
                         f"{', '.join(map(repr, NESTING_KEYS))}; expected a state dict")
    return {key.removeprefix(WRAPPER_PREFIX): value for key, value in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Vision: CLIP ViT -> timm


@dataclass
class ClipStateDict:
    """A CLIP ViT's weights under timm's names, and the checkpoint keys left out as unused."""

    state_dict: dict[str, torch.Tensor]
    dropped: list[str]  # CLIP's text tower and its image projection
    layout: str  # "timm" or "openai"


def marker_prefix(keys: Sequence[str], marker: str) -> str | None:
    """The prefix in front of `marker` ('', 'visual.', ...), or None when no key ends in it."""
    for key in keys:
        if key == marker or key.endswith("." + marker):
            return key[: -len(marker)]
    return None


def openai_to_timm(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One OpenAI CLIP visual tensor (name below `visual.`) under its timm name and shape.

    Names that have no timm counterpart are kept, so the strict load reports them.
    """
    if key == "class_embedding":
        return "cls_token", value.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
    if key == "positional_embedding":
        return "pos_embed", value.unsqueeze(0)  # (1 + N, D) -> (1, 1 + N, D)
    for old, new in OPENAI_RENAMES:
        if key.startswith(old):
            return new + key[len(old):], value
    if key.startswith(OPENAI_BLOCKS):
        index, rest = key[len(OPENAI_BLOCKS):].split(".", 1)
        for old, new in OPENAI_BLOCK_RENAMES:
            if rest.startswith(old):
                return f"blocks.{index}.{new}{rest[len(old):]}", value
    return key, value


def read_clip_state_dict(path: PathLike) -> ClipStateDict:
    """A CLIP ViT checkpoint (timm or OpenAI layout) as a state dict of timm's VisionTransformer."""
    raw = read_state_dict(path)
    keys = list(raw)
    if (prefix := marker_prefix(keys, TIMM_MARKER)) is not None:
        layout = "timm"
    elif (prefix := marker_prefix(keys, OPENAI_MARKER)) is not None:
        layout = "openai"
    else:
        raise ValueError(
            f"{path} is not a CLIP ViT checkpoint: no key ends in {TIMM_MARKER!r} (timm layout) or "
            f"{OPENAI_MARKER!r} (OpenAI layout; ResNet CLIPs are not supported). Keys seen: {preview(keys)}"
        )
    state, dropped = {}, []
    for key, value in raw.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name.startswith(CLIP_PROJECTION[layout]):
            dropped.append(key)
            continue
        if layout == "openai":
            name, value = openai_to_timm(name, value)
        state[name] = value
    log.info("%s: CLIP ViT in the %s layout, %d tensors; %d unused dropped: %s",
             path, layout, len(state), len(dropped), preview(dropped) or "none")
    return ClipStateDict(state_dict=state, dropped=dropped, layout=layout)


def describe_vit(state: Mapping[str, torch.Tensor]) -> str:
    """The sizes a timm ViT state dict was built with, in VisionConfig's words."""
    parts = []
    patch = state.get("patch_embed.proj.weight")  # (width, 3, patch, patch)
    if patch is not None:
        parts += [f"width={patch.shape[0]}", f"patch_size={patch.shape[-1]}"]
    parts.append(f"depth={len({key.split('.')[1] for key in state if key.startswith('blocks.')})}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")  # (hidden, width)
    if fc1 is not None:
        parts.append(f"mlp_ratio={fc1.shape[0] / fc1.shape[1]:g}")
    pos_embed = state.get("pos_embed")  # (1, 1 + g*g, width)
    if pos_embed is not None and patch is not None:
        grid = math.isqrt(pos_embed.shape[-2] - 1)
        parts.append(f"image_size={grid * patch.shape[-1]} ({grid}x{grid} patches)")
    return ", ".join(parts)


@torch.no_grad()
def load_vision_weights(vision: VisionEncoder, path: PathLike) -> ClipStateDict:
    """Load a CLIP ViT checkpoint into `vision.vit`, strictly.

    Position embeddings at another patch grid are resized bilinearly ([CLS] kept). Momentum copies
    are not touched: call `sync_momentum` on the model afterwards (`load_pretrained_parts` does).
    """
    ckpt = read_clip_state_dict(path)
    state = dict(ckpt.state_dict)
    target = vision.vit.state_dict()
    seen, built = describe_vit(state), describe_vit(target)

    if "pos_embed" in state and state["pos_embed"].shape[-2] != target["pos_embed"].shape[-2]:
        old = math.isqrt(state["pos_embed"].shape[-2] - 1)
        grid = math.isqrt(target["pos_embed"].shape[-2] - 1)
        state["pos_embed"] = resize_position_embedding(state["pos_embed"], grid)
        log.info("%s: position embeddings resized from %dx%d to %dx%d patches ([CLS] kept)",
                 path, old, old, grid, grid)

    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    if missing or unexpected:
        raise ValueError(
            f"vision weights {path} do not fit the model's ViT: {len(missing)} model tensors missing "
            f"({preview(missing) or 'none'}), {len(unexpected)} unexpected "
            f"({preview(unexpected) or 'none'}). "
            f"The checkpoint has {seen}; the model was built with {built}: set model.vision to the "
            "checkpoint's sizes (heads = width // 64 for CLIP)"
        )
    wrong = [key for key in target if state[key].shape != target[key].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"vision weights {path}: {key} is {tuple(state[key].shape)} in the checkpoint but "
            f"{tuple(target[key].shape)} in the model ({len(wrong)} of {len(target)} tensors differ: "
            f"{preview(wrong)}). "
            f"The checkpoint has {seen}; the model was built with {built}: set model.vision to the "
            "checkpoint's sizes (heads = width // 64 for CLIP)"
        )
    vision.vit.load_state_dict(state, strict=True)
    return replace(ckpt, state_dict=state)


# ---------------------------------------------------------------------------------------------
# Text: BERT -> text encoder, fusion, decoder, MLM heads


@dataclass
class BertLoadReport:
    """Where each BERT tensor went and which text-side model tensors kept their initialisation."""

    copied: dict[str, str]  # model tensor -> the BERT tensor copied into it
    new: list[str]  # model tensors left as initialised: cross-attention, and heads without cls.*
    unused: list[str]  # BERT tensors copied nowhere (pooler, next-sentence head, ...)


def read_bert_directory(directory: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a Hugging Face BERT directory, without the 'bert.' prefix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"BERT directory {directory} does not exist; expected a local Hugging Face "
                                "BERT directory (config.json and model.safetensors); nothing is downloaded")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"BERT directory {directory} has no config.json; expected a Hugging Face "
                                "BERT directory as written by save_pretrained")
    weights = next((directory / name for name in BERT_WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"BERT directory {directory} has none of {', '.join(BERT_WEIGHT_FILES)}")
    state = {}
    for key, value in read_state_dict(weights).items():
        key = key.removeprefix(BERT_PREFIX)
        for old, new in LEGACY_NORM_NAMES:
            if "LayerNorm" in key and key.endswith(old):
                key = key[: -len(old)] + new
        state[key] = value
    return json.loads(config_file.read_text()), state


def fusion_offset(text: TextConfig, fusion_layers: int, depth: int, *, universal: bool) -> int:
    """The BERT layer that initialises fusion layer 0: E for mPLUG, depth - F for mPLUG-2."""
    return depth - fusion_layers if universal else text.encoder_layers


def check_bert_config(
    config: dict, text: TextConfig, fusion_layers: int, directory: PathLike, *, universal: bool = False
) -> None:
    """The BERT's sizes must be the model's, and it must be deep enough for the fusion and decoder."""
    mismatches = [
        f"{bert_name}={config.get(bert_name)} where the model has text.{ours}={getattr(text, ours)}"
        for bert_name, ours in BERT_CONFIG_FIELDS.items()
        if config.get(bert_name) != getattr(text, ours)
    ]
    if mismatches:
        raise ValueError(
            f"BERT at {directory} does not match the model's text config: {'; '.join(mismatches)}. "
            "Set model.text to the BERT's sizes from its config.json, or use a BERT of the model's sizes"
        )
    depth = config.get("num_hidden_layers", 0)
    if universal:  # mPLUG-2: the text encoder is the whole BERT, the fusion its last layers again
        for part, layers in (("text.encoder_layers", text.encoder_layers), ("fusion.layers", fusion_layers)):
            if layers > depth:
                raise ValueError(
                    f"{part}={layers}: that many layers start from BERT layers, but {directory} has only "
                    f"{depth} (num_hidden_layers={depth}): use a deeper BERT or fewer layers"
                )
    else:
        needed = text.encoder_layers + fusion_layers
        if needed > depth:
            first = max(depth - text.encoder_layers, 0)
            raise ValueError(
                f"fusion layer {first} is initialised from BERT layer {text.encoder_layers + first}, but "
                f"{directory} has only {depth} layers (num_hidden_layers={depth}); text.encoder_layers + "
                f"fusion.layers = {needed} must be at most {depth}: use a deeper BERT or fewer layers"
            )
    if text.decoder_layers > depth:
        raise ValueError(
            f"decoder layer {depth} is initialised from BERT layer {depth}, but {directory} has only "
            f"{depth} layers (num_hidden_layers={depth}); text.decoder_layers={text.decoder_layers} must "
            f"be at most {depth}: use a deeper BERT or fewer decoder layers"
        )


def bert_source(name: str, fusion_start: int) -> str | None:
    """The BERT tensor that initialises model tensor `name`, or None when it starts new.

    Fusion layer j starts from BERT layer `fusion_start` + j.
    """
    module, _, rest = name.partition(".")
    if module in ("text_encoder", "decoder") and rest.startswith("embeddings."):
        return rest
    if module in ("text_encoder", "fusion", "decoder") and rest.startswith("layers."):
        index, part = rest[len("layers."):].split(".", 1)
        if part.startswith("crossattention."):
            return None
        offset = fusion_start if module == "fusion" else 0
        return f"encoder.layer.{int(index) + offset}.{part}"
    for head in MLM_HEADS:
        if name.startswith(head):
            part = name[len(head):]
            if part.startswith("transform."):
                return "cls.predictions." + part
            if part in ("bias", "decoder.bias"):  # one tensor under both names
                return "cls.predictions.bias"
    return None


@torch.no_grad()
def load_bert_weights(model: MPLUG, directory: PathLike) -> BertLoadReport:
    """Initialise the text encoder, fusion, decoder and MLM heads from a local BERT directory."""
    text = model.cfg.text
    config, bert = read_bert_directory(directory)
    universal = model.universal is not None
    fusion_layers = len(model.fusion.layers)
    check_bert_config(config, text, fusion_layers, directory, universal=universal)
    fusion_start = fusion_offset(text, fusion_layers, config.get("num_hidden_layers", 0), universal=universal)

    plan, new = {}, []  # model tensor -> BERT tensor; model tensors left as initialised
    params = dict(model.named_parameters())  # tied tensors appear once, under their first name
    for name, param in params.items():
        if name.partition(".")[0] not in TEXT_MODULES:
            continue
        source = bert_source(name, fusion_start)
        if source is None or (source not in bert and source.startswith("cls.")):
            new.append(name)
            continue
        if source not in bert:
            raise ValueError(f"BERT at {directory} has no tensor {source!r}, needed for {name}; "
                             f"its tensors: {preview(sorted(bert))}")
        if bert[source].shape != param.shape:
            raise ValueError(f"BERT at {directory}: {source} is {tuple(bert[source].shape)} but {name} "
                             f"is {tuple(param.shape)}; the BERT and model.text sizes differ")
        plan[name] = source
    for name, source in plan.items():
        params[name].copy_(bert[source])

    used = set(plan.values())
    report = BertLoadReport(copied=plan, new=new, unused=[key for key in bert if key not in used])
    log.info("BERT %s: %d tensors copied; %d stay newly initialised (%s); %d unused (%s)",
             directory, len(plan), len(new), preview(new) or "none", len(report.unused),
             preview(report.unused) or "none")
    if model.momentum is not None:
        sync_momentum(model)
    return report


# ---------------------------------------------------------------------------------------------
# Momentum copies, tokenizer, and everything a config names


@torch.no_grad()
def sync_momentum(model: MPLUG) -> None:
    """Set every momentum copy equal to its online module, as after loading pretrained weights."""
    model.momentum.load_state_dict(nn.ModuleDict(model.momentum_sources()).state_dict())


def load_tokenizer(directory: PathLike) -> BertTokenizerFast:
    """The BERT WordPiece tokenizer saved in a local directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist; expected a local "
                                f"directory with {' or '.join(TOKENIZER_FILES)} (nothing is downloaded)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        held = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"tokenizer directory {directory} has no {' or '.join(TOKENIZER_FILES)} "
                                f"(it holds: {preview(held) or 'nothing'}); save one with "
                                "BertTokenizerFast.save_pretrained")
    return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)


@dataclass
class PretrainedParts:
    vision: ClipStateDict | None
    text: BertLoadReport | None


def load_pretrained_parts(model: MPLUG, cfg: ModelConfig) -> PretrainedParts:
    """Load `cfg.vision.weights` and `cfg.text.weights` when set, then sync the momentum copies."""
    vision = load_vision_weights(model.vision, cfg.vision.weights) if cfg.vision.weights else None
    text = load_bert_weights(model, cfg.text.weights) if cfg.text.weights else None
    if vision is not None and model.momentum is not None:
        sync_momentum(model)
    return PretrainedParts(vision=vision, text=text)
