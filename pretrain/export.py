"""`mplug export`: a model package in layouts that other tools read, without this project's trainer.

    --format safetensors   OUT/model.safetensors   every online tensor under this project's names, tied
                                                   ones once (`tied` in config.json says which)
                           OUT/config.json         the model config and the tied names
                           OUT/tokenizer/
    --format hf            OUT/vision/             a timm model: timm.create_model("local-dir:OUT/vision",
                                                   pretrained=True) gives the CLIP ViT (all tokens after its
                                                   final norm: `forward_features`)
                           OUT/text_encoder/       transformers BertModel.from_pretrained(..., add_pooling_layer=False)
                           OUT/decoder/            transformers BertLMHeadModel (causal, cross-attention to
                                                   [v ; fused text]), tokenizer beside both
                           OUT/mplug.safetensors   what neither library has a class for: the fusion (its
                                                   skip-connected layers), the large model's vision projection,
                                                   the ITC, ITM and MLM heads and the temperature
                           OUT/config.json         the model config and where each part lies

The momentum copies are training state and are left out. `load_export` rebuilds MPLUG from either
layout (through timm and transformers for the hf one), so an export can be checked against its package.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import BertLMHeadModel, BertModel

from pretrain.config import from_dict, to_dict
from pretrain.config.schema import ModelConfig, VisionConfig
from pretrain.models.mplug import MPLUG
from pretrain.models.text import bert_config
from pretrain.models.weights import PathLike, preview
from pretrain.package import MOMENTUM_PREFIX, Layout, load_package

log = logging.getLogger(__name__)

SAFETENSORS, HF = "safetensors", "hf"
FORMATS = (SAFETENSORS, HF)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REST_FILE = "mplug.safetensors"
TOKENIZER_DIR = "tokenizer"
VISION_DIR, TEXT_ENCODER_DIR, DECODER_DIR = "vision", "text_encoder", "decoder"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the normalisation the vision tower was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Our prefix -> the transformers model's, per exported text part.
TEXT_ENCODER_NAMES = (("text_encoder.embeddings.", "embeddings."), ("text_encoder.layers.", "encoder.layer."))
DECODER_NAMES = (
    ("decoder.embeddings.", "bert.embeddings."),
    ("decoder.layers.", "bert.encoder.layer."),
    ("decoder.lm_head.head.predictions.", "cls.predictions."),
)
VISION_PREFIX = "vision.vit."


class ExportError(ValueError):
    """An export folder is missing a part or does not fit its config."""


def renamed(state: Mapping[str, torch.Tensor], names: tuple[tuple[str, str], ...], *, reverse: bool = False
            ) -> dict[str, torch.Tensor]:
    """The tensors of `state` under one of the prefixes, renamed (ours -> theirs, or back with `reverse`)."""
    out = {}
    for key, value in state.items():
        for ours, theirs in names:
            old, new = (theirs, ours) if reverse else (ours, theirs)
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def online_state(model: MPLUG) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The online tensors (momentum copies left out), tied ones once, and the tied names -> stored name."""
    layout = Layout.of(model)
    state = model.state_dict()
    stored = {name: state[name].detach().contiguous() for name in layout.shapes if not name.startswith(MOMENTUM_PREFIX)}
    tied = {alias: name for alias, name in layout.aliases.items() if not alias.startswith(MOMENTUM_PREFIX)}
    return stored, tied


def timm_config(vision: VisionConfig) -> dict:
    """timm's config.json for the vision tower: architecture, the arguments that rebuild it, preprocessing."""
    size = vision.image_size
    return {
        "architecture": vision.arch,
        "num_classes": 0,
        "global_pool": "",
        "model_args": {
            "img_size": size, "patch_size": vision.patch_size, "embed_dim": vision.width, "depth": vision.depth,
            "num_heads": vision.heads, "mlp_ratio": vision.mlp_ratio, "global_pool": "", "num_classes": 0,
            "act_layer": "quick_gelu" if vision.quick_gelu else "gelu",
        },
        "pretrained_cfg": {
            "input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic",
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "num_classes": 0, "crop_pct": 1.0,
        },
    }


def export_safetensors(model: MPLUG, tokenizer, output: Path) -> None:
    stored, tied = online_state(model)
    save_file(stored, str(output / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"format": SAFETENSORS, "model": to_dict(model.cfg), "tied": tied, "weights": WEIGHTS_FILE}
    (output / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.save_pretrained(str(output / TOKENIZER_DIR))


def export_hf(model: MPLUG, tokenizer, output: Path) -> None:
    cfg = model.cfg
    stored, tied = online_state(model)

    vision_dir = output / VISION_DIR
    vision_dir.mkdir()
    vit = {key[len(VISION_PREFIX):]: value for key, value in stored.items() if key.startswith(VISION_PREFIX)}
    save_file(vit, str(vision_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (vision_dir / CONFIG_FILE).write_text(json.dumps(timm_config(cfg.vision), indent=2) + "\n")

    encoder_config = bert_config(cfg.text)
    encoder_config.num_hidden_layers = cfg.text.encoder_layers
    save_transformers(BertModel(encoder_config, add_pooling_layer=False), renamed(stored, TEXT_ENCODER_NAMES),
                      output / TEXT_ENCODER_DIR, tokenizer)
    decoder_config = bert_config(cfg.text, decoder=True)
    decoder_config.num_hidden_layers = cfg.text.decoder_layers
    save_transformers(BertLMHeadModel(decoder_config), renamed(stored, DECODER_NAMES), output / DECODER_DIR, tokenizer)

    taken = (VISION_PREFIX, *(ours for ours, _ in TEXT_ENCODER_NAMES + DECODER_NAMES))
    rest = {key: value for key, value in stored.items() if not key.startswith(taken)}
    save_file(rest, str(output / REST_FILE), metadata={"format": "pt"})
    meta = {
        "format": HF, "model": to_dict(cfg), "tied": tied,
        "parts": {VISION_DIR: "timm", TEXT_ENCODER_DIR: "transformers BertModel",
                  DECODER_DIR: "transformers BertLMHeadModel", REST_FILE: "this project's names"},
    }
    (output / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_transformers(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path, tokenizer) -> None:
    """Load `state` into the transformers model (ties excepted) and save it with the tokenizer."""
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | {
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ExportError(f"{type(model).__name__}: missing {preview(missing) or 'none'}, unexpected "
                          f"{preview(result.unexpected_keys) or 'none'}")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def export_package_as(package: PathLike, output: PathLike, fmt: str) -> Path:
    """Write the package at `package` in format `fmt` ('safetensors' or 'hf') under `output`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} is not empty; export into a new or empty folder")
    loaded = load_package(package, momentum=False)
    output.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            (export_safetensors if fmt == SAFETENSORS else export_hf)(loaded.model, loaded.tokenizer, output)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    log.info("package %s exported as %s to %s", package, fmt, output)
    return output


# ---------------------------------------------------------------------------------------------
# Reading an export back


def read_export_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{directory} has no {CONFIG_FILE}; it is not an `mplug export` folder")
    meta = json.loads(path.read_text())
    if meta.get("format") not in FORMATS:
        raise ExportError(f"{path} names format {meta.get('format')!r}; expected one of {', '.join(FORMATS)}")
    return meta


def load_export(directory: PathLike) -> MPLUG:
    """MPLUG rebuilt from an export folder of either format, in eval mode (no momentum copies)."""
    directory = Path(directory)
    meta = read_export_config(directory)
    cfg = from_dict(ModelConfig, meta["model"], path="model")
    if meta["format"] == SAFETENSORS:
        state = load_file(str(directory / WEIGHTS_FILE))
    else:
        vit = timm.create_model(f"local-dir:{directory / VISION_DIR}", pretrained=True)
        state = {VISION_PREFIX + key: value for key, value in vit.state_dict().items()}
        encoder = BertModel.from_pretrained(str(directory / TEXT_ENCODER_DIR), add_pooling_layer=False)
        state.update(renamed(encoder.state_dict(), TEXT_ENCODER_NAMES, reverse=True))
        decoder = BertLMHeadModel.from_pretrained(str(directory / DECODER_DIR))
        state.update(renamed(decoder.state_dict(), DECODER_NAMES, reverse=True))
        state.update(load_file(str(directory / REST_FILE)))
    state.update({alias: state[name] for alias, name in meta["tied"].items() if alias not in state})
    model = MPLUG(cfg, momentum=False)
    model.load_state_dict(state, strict=True)
    return model.eval()
