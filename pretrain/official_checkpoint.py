"""Official mPLUG checkpoints (X-PLUG/mPLUG) as this project's MPLUG state dict, every tensor accounted for.

An official checkpoint is a `.pth` holding `model` (or `module`): the state dict of one of the official
model classes. Pretraining checkpoints (mplug_base.pth, mplug_large.pth, mplug_large_v2.pth) name the
BERT parts one level deeper (`text_encoder.bert.*`, `fusion_encoder.fusion.*`); task checkpoints (VQA,
caption, retrieval) name them directly (`text_encoder.*`, `fusion_encoder.*`). Either way:

    visual_encoder.visual.*               -> vision.vit.*  (OpenAI CLIP names -> timm's; in_proj stays fused as qkv)
    visn_fc, visn_layer_norm (large)      -> vision.proj.0, vision.proj.1
    text_encoder[.bert].embeddings, encoder.layer.i   -> text_encoder.embeddings, text_encoder.layers.i
    fusion_encoder[.fusion].encoder.layer.S+j         -> fusion.layers.j   (S = official depth 12 - F: only those run)
    text_decoder.bert.*, text_decoder.cls.predictions -> decoder.*, decoder.lm_head (output matrix tied)
    {text,fusion}_encoder.cls.predictions (pretraining) -> mlm_head (output matrix tied to the text encoder's words)
    vision_proj, text_proj, itm_head, temp            -> the same names (temp () -> (1,))
    X_m (momentum copies)                 -> momentum.X where this model keeps a copy of X
    image_queue, text_queue, idx_queue, queue_ptr     -> the ITC queue (FeatureQueue's buffers)

Dropped, each with its reason in the report: CLIP's text tower and image projection, the fusion layers
and fusion embeddings the official forward never runs, the cross-attention of connected-attention
layers (skipped by the official forward too), BERT's pooler and position-id buffers, and the momentum
decoder. A key no rule knows is an error, so nothing is lost silently; every mapped tensor's shape is
checked against the model the config builds (on the meta device).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as save_tensors

from pretrain.config import Config, load_config
from pretrain.models.fusion import fusion_pattern
from pretrain.models.mplug import MOMENTUM_MODULES, MPLUG
from pretrain.models.weights import PathLike, openai_to_timm, preview, read_state_dict
from pretrain.package import MOMENTUM_PREFIX, QUEUE_FILE, Layout, export_package, layout_of_config

log = logging.getLogger(__name__)

PRETRAINING, VQA, CAPTION, RETRIEVAL = "pretraining", "vqa", "caption", "retrieval"
OFFICIAL_MODELS = (PRETRAINING, VQA, CAPTION, RETRIEVAL)
SIZE_PRESETS = ("base", "large")  # the released sizes, suggested when a checkpoint does not fit the config
REPORT_FILE = "import_report.json"  # in the package: where every official tensor went
MODELSCOPE_PREFIX = "model."  # ModelScope's copies of the checkpoints put every key under it

# Official top-level module -> ours. The same name with "_m" is its momentum copy.
OFFICIAL_MODULES = {
    "visual_encoder": "vision",
    "visn_fc": "vision.proj.0",
    "visn_layer_norm": "vision.proj.1",
    "text_encoder": "text_encoder",
    "fusion_encoder": "fusion",
    "text_decoder": "decoder",
    "vision_proj": "vision_proj",
    "text_proj": "text_proj",
    "itm_head": "itm_head",
}
MOMENTUM_SUFFIX = "_m"
QUEUE_KEYS = {"image_queue": "image", "text_queue": "text", "idx_queue": "ids", "queue_ptr": "ptr"}
QUEUE_FILLED = "filled"  # FeatureQueue's count of filled slots; official queues use every slot
TEMPERATURE = "temp"
CLIP_VISUAL = "visual."
CLIP_PROJECTION = "proj"
LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
MLM_HEAD = "cls.predictions."
OUR_MLM_HEAD = "mlm_head.head.predictions."
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
POSITION_IDS = "embeddings.position_ids"
BERT_WRAPPERS = ("bert.", "fusion.")  # the extra level of pretraining checkpoints' BERT parts

REASONS = {
    "clip_text": "CLIP's text tower: mPLUG never runs it",
    "clip_proj": "CLIP's image projection: mPLUG takes all tokens after ln_post, unprojected",
    "fusion_embeddings": "fusion embeddings: never run (the fusion input is the text encoder's output)",
    "position_ids": "position-id buffer: rebuilt by the model",
    "pooler": "BERT pooler: unused by mPLUG",
    "momentum_decoder": "momentum decoder: this model keeps none (the official VQA distillation weight never "
                        "reached the loss)",
    "second_mlm": "a second MLM head: the MLM objective predicts through the fusion module's head",
    "no_copy": "momentum copy of a module this model keeps no copy of",
}


class OfficialCheckpointError(ValueError):
    """An official checkpoint does not fit the config, or holds tensors no rule knows."""


@dataclass
class OfficialImport:
    """An official checkpoint converted: our state dict and where every official tensor went."""

    config: Config  # the config fitted to the checkpoint (image size, queue size)
    model: str  # the official model class: pretraining, vqa, caption or retrieval
    naming: str  # "pretraining" (text_encoder.bert.*, fusion_encoder.fusion.*) or "task"
    momentum: bool  # whether the checkpoint holds momentum copies (and the package will)
    state_dict: dict[str, torch.Tensor]  # our name -> tensor
    sources: dict[str, str]  # our name -> the official key it came from
    tied: dict[str, str] = field(default_factory=dict)  # official key -> the official key it equals (stored once)
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> why it is not carried
    missing: list[str] = field(default_factory=list)  # our tensors the checkpoint lacks
    queue: dict[str, torch.Tensor] = field(default_factory=dict)  # FeatureQueue buffers, when present

    def report(self) -> dict:
        """Plain JSON: where each official tensor went, what was dropped and why, what stays new."""
        return {
            "official_model": self.model, "naming": self.naming, "momentum": self.momentum,
            "image_size": self.config.model.vision.image_size,
            "mapped": {official: ours for ours, official in self.sources.items()},
            "tied": dict(self.tied),
            "queue": {key: f"itc queue {name}" for key, name in QUEUE_KEYS.items() if name in self.queue},
            "dropped": dict(self.dropped), "new": list(self.missing),
        }


# ---------------------------------------------------------------------------------------------
# Routing one official key


@dataclass
class Mapped:
    target: str  # our name, below the official module's counterpart unless `absolute`
    tensor: torch.Tensor
    absolute: bool = False


@dataclass
class Dropped:
    reason: str


@dataclass
class Tied:
    canonical: str  # the official key whose values this one must repeat
    fallback: str | None = None  # drop reason when the values differ; None: differing values are an error


Route = Mapped | Dropped | Tied


@dataclass
class Plan:
    """What the routing needs to know about the checkpoint and the model."""

    fusion_start: int  # official fusion layer that becomes our layer 0
    pattern: list[str]  # our fusion layer kinds
    mlm_owner: str | None  # official module whose cls.predictions becomes our MLM head
    words: dict[bool, str]  # the text encoder's word-embedding key, online (False) and momentum (True)


def unwrap_bert(rest: str) -> str:
    for wrapper in BERT_WRAPPERS:
        if rest.startswith(wrapper):
            return rest[len(wrapper):]
    return rest


def route_vision(key: str, rest: str, value: torch.Tensor) -> Route:
    if not rest.startswith(CLIP_VISUAL):
        return Dropped(REASONS["clip_text"])
    name = rest[len(CLIP_VISUAL):]
    if name == CLIP_PROJECTION:
        return Dropped(REASONS["clip_proj"])
    timm_name, tensor = openai_to_timm(name, value)  # class and position embeddings reshaped (views)
    if timm_name == name:
        raise OfficialCheckpointError(f"{key}: no timm ViT tensor corresponds to CLIP's {name!r}")
    return Mapped(f"vit.{timm_name}", tensor)


def route_mlm(key: str, module: str, head: str, value: torch.Tensor, plan: Plan, momentum: bool) -> Route:
    """`head`: the name below `cls.predictions.` of the text or fusion encoder (pretraining checkpoints)."""
    if module != plan.mlm_owner:
        return Dropped(REASONS["second_mlm"])
    if head == "decoder.bias":
        return Tied(key.removesuffix("decoder.bias") + "bias")
    if head == "decoder.weight":
        return Tied(plan.words[momentum], fallback=(
            "MLM output matrix: the official model ties it to the fusion module's own word embeddings, "
            "which differ from the text encoder's; this model ties its MLM head to the text encoder's"))
    return Mapped(OUR_MLM_HEAD + head, value, absolute=True)


def route_bert_parts(key: str, module: str, rest: str, value: torch.Tensor, plan: Plan, momentum: bool) -> Route | None:
    """Embeddings, layers, pooler and MLM head of an official BERT-based module; None when unknown."""
    inner = unwrap_bert(rest)
    if inner.startswith(MLM_HEAD) and module in ("text_encoder", "fusion_encoder"):
        return route_mlm(key, module, inner[len(MLM_HEAD):], value, plan, momentum)
    if inner == POSITION_IDS:
        return Dropped(REASONS["position_ids"])
    if inner.startswith("pooler."):
        return Dropped(REASONS["pooler"])
    if inner.startswith("embeddings."):
        if module == "fusion_encoder":
            return Dropped(REASONS["fusion_embeddings"])
        return Mapped(inner, value)
    layer = LAYER.match(inner)
    if layer is None:
        return None
    index, part = int(layer[1]), layer[2]
    if module == "fusion_encoder":
        ours = index - plan.fusion_start
        if ours < 0:
            return Dropped(f"fusion layer {index}: never run (the official forward starts at layer "
                           f"{plan.fusion_start})")
        if ours < len(plan.pattern) and plan.pattern[ours] == "connected" and part.startswith("crossattention."):
            return Dropped(f"cross-attention of fusion layer {index}, a connected-attention layer: skipped by "
                           "the official forward too")
        index = ours
    return Mapped(f"layers.{index}.{part}", value)


def route_decoder(key: str, rest: str, value: torch.Tensor, plan: Plan) -> Route | None:
    if not rest.startswith(MLM_HEAD):
        return route_bert_parts(key, "text_decoder", rest, value, plan, False) if rest.startswith("bert.") else None
    head = rest[len(MLM_HEAD):]
    if head == "decoder.weight":  # tied to the decoder's word embeddings
        return Tied(key.removesuffix(MLM_HEAD + head) + "bert." + WORD_EMBEDDINGS)
    if head == "decoder.bias":  # BERT's second name of the output bias
        return Tied(key.removesuffix("decoder.bias") + "bias")
    return Mapped(f"lm_head.head.predictions.{head}", value)


def route(key: str, value: torch.Tensor, plan: Plan) -> Route:
    """Where official tensor `key` goes; raises for a key no rule knows."""
    head, _, rest = key.partition(".")
    base = head.removesuffix(MOMENTUM_SUFFIX)
    momentum = base != head
    if base not in OFFICIAL_MODULES:
        raise OfficialCheckpointError(unknown_key_message(key))
    ours = OFFICIAL_MODULES[base]
    if momentum and base == "text_decoder":
        return Dropped(REASONS["momentum_decoder"])
    if momentum and ours.split(".")[0] not in MOMENTUM_MODULES:
        return Dropped(REASONS["no_copy"])
    if base == "visual_encoder":
        found = route_vision(key, rest, value)
    elif base == "text_decoder":
        found = route_decoder(key, rest, value, plan)
    elif base in ("text_encoder", "fusion_encoder"):
        found = route_bert_parts(key, base, rest, value, plan, momentum)
    else:
        found = Mapped(rest, value)
    if found is None:
        raise OfficialCheckpointError(unknown_key_message(key))
    if isinstance(found, Mapped):
        target = found.target if found.absolute else f"{ours}.{found.target}"
        found = Mapped(MOMENTUM_PREFIX + target if momentum else target, found.tensor, absolute=True)
    return found


def unknown_key_message(key: str) -> str:
    known = ", ".join(sorted(OFFICIAL_MODULES) + sorted(QUEUE_KEYS) + [TEMPERATURE])
    return (f"official checkpoint key {key!r} matches no known part of the official mPLUG models (top-level "
            f"modules: {known}, each also with '_m'); grounding and video checkpoints are not supported")


# ---------------------------------------------------------------------------------------------
# The checkpoint as a whole


def strip_modelscope_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(MODELSCOPE_PREFIX) for key in state):
        return {key[len(MODELSCOPE_PREFIX):]: value for key, value in state.items()}
    return dict(state)


def official_naming(state: Mapping[str, torch.Tensor]) -> str:
    pretraining = any(key.startswith(("text_encoder.bert.", "fusion_encoder.fusion.")) for key in state)
    return PRETRAINING if pretraining else "task"


def official_model(state: Mapping[str, torch.Tensor]) -> str:
    """Which official model class wrote the checkpoint, from the modules it holds."""
    modules = {key.split(".")[0] for key in state}
    if "text_decoder" in modules and "itm_head" in modules:
        return PRETRAINING
    if "itm_head" in modules:
        return RETRIEVAL
    if "text_decoder" in modules:
        # The VQA model distils (text_decoder_m); the caption model has no momentum copies.
        return VQA if "text_decoder_m" in modules else CAPTION
    raise OfficialCheckpointError(
        f"cannot tell which official mPLUG model wrote this checkpoint: it has no text_decoder and no itm_head "
        f"(top-level modules: {', '.join(sorted(modules))})")


def layer_indices(state: Mapping[str, torch.Tensor], module: str) -> set[int]:
    found = set()
    for key in state:
        head, _, rest = key.partition(".")
        if head == module and (layer := LAYER.match(unwrap_bert(rest))):
            found.add(int(layer[1]))
    return found


def fit_config(state: Mapping[str, torch.Tensor], config: Config, config_name: str) -> Config:
    """`config` with the checkpoint's image size and queue size; the rest must already agree."""
    conv = state.get("visual_encoder.visual.conv1.weight")  # (width, 3, patch, patch)
    pos = state.get("visual_encoder.visual.positional_embedding")  # (1 + g*g, width)
    if conv is None or pos is None:
        raise OfficialCheckpointError("the checkpoint has no visual_encoder.visual.conv1.weight or positional_embedding; "
                                      "it is not an official mPLUG checkpoint")
    vision = config.model.vision
    depth = len({key.split(".")[4] for key in state if key.startswith("visual_encoder.visual.transformer.resblocks.")})
    seen = {"width": conv.shape[0], "patch_size": conv.shape[-1], "depth": depth}
    wrong = {name: value for name, value in seen.items() if getattr(vision, name) != value}
    if wrong:
        raise OfficialCheckpointError(
            f"the checkpoint's CLIP ViT has {', '.join(f'{k}={v}' for k, v in seen.items())} but config "
            f"{config_name!r} has model.vision {', '.join(f'{k}={getattr(vision, k)}' for k in wrong)}; "
            f"{suggest_preset(seen)}")
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise OfficialCheckpointError(f"visual_encoder.visual.positional_embedding holds {pos.shape[0]} positions: "
                                      "not [CLS] plus a square grid")
    model = dataclasses.replace(config.model, vision=dataclasses.replace(vision, image_size=grid * seen["patch_size"]))
    if (queue := state.get("image_queue")) is not None:
        model = dataclasses.replace(model, queue_size=queue.shape[1])
    return dataclasses.replace(config, model=model)


def suggest_preset(seen: Mapping[str, int]) -> str:
    for name in SIZE_PRESETS:
        vision = load_config(name).model.vision
        if all(getattr(vision, key) == value for key, value in seen.items()):
            return f"use --config {name}"
    return f"none of the presets {', '.join(SIZE_PRESETS)} has this ViT"


def check_depths(state: Mapping[str, torch.Tensor], config: Config, config_name: str) -> int:
    """The official fusion layer our layer 0 comes from; raises when the BERT depths do not fit."""
    text = config.model.text
    for module, wanted, name in (("text_encoder", text.encoder_layers, "model.text.encoder_layers"),
                                 ("text_decoder", text.decoder_layers, "model.text.decoder_layers")):
        found = layer_indices(state, module)
        if found and len(found) != wanted:
            raise OfficialCheckpointError(f"the checkpoint's {module} has {len(found)} layers but config "
                                          f"{config_name!r} has {name}={wanted}; set it to {len(found)}")
    fusion = layer_indices(state, "fusion_encoder")
    layers = config.model.fusion.layers
    if len(fusion) < layers:
        raise OfficialCheckpointError(f"the checkpoint's fusion_encoder has {len(fusion)} layers, fewer than "
                                      f"model.fusion.layers={layers} of config {config_name!r}")
    return len(fusion) - layers  # the official FusionEncoder's start_layer


def mlm_owner(state: Mapping[str, torch.Tensor]) -> str | None:
    for module in ("fusion_encoder", "text_encoder"):
        if any(key.startswith(module + ".") and unwrap_bert(key.partition(".")[2]).startswith(MLM_HEAD)
               for key in state):
            return module
    return None


def word_embedding_keys(state: Mapping[str, torch.Tensor]) -> dict[bool, str]:
    """The official key of the text encoder's word embeddings, online (False) and momentum (True)."""
    keys = {}
    for momentum in (False, True):
        module = "text_encoder" + (MOMENTUM_SUFFIX if momentum else "")
        keys[momentum] = next((k for k in (f"{module}.bert.{WORD_EMBEDDINGS}", f"{module}.{WORD_EMBEDDINGS}")
                               if k in state), f"{module}.{WORD_EMBEDDINGS}")
    return keys


def convert_official(
    state: Mapping[str, torch.Tensor], config: Config, *, config_name: str, model: str | None = None
) -> OfficialImport:
    """An official checkpoint's state dict as ours for `config` (fitted to the checkpoint's image size);
    `config_name` is how error messages name the config (the preset or file it came from).

    `model` overrides the detected official model class (e.g. caption for a VQA-looking checkpoint).
    Tensors are not copied: mapped ones are the checkpoint's (reshaped views where CLIP's layout differs).
    """
    state = strip_modelscope_prefix(state)
    detected = official_model(state)
    if model is not None and model != detected and {model, detected} != {VQA, CAPTION}:
        raise OfficialCheckpointError(f"the checkpoint holds the modules of the official {detected} model, not of "
                                      f"the {model} model; drop the task choice or pick {detected}")
    config = fit_config(state, config, config_name)
    plan = Plan(fusion_start=check_depths(state, config, config_name),
                pattern=fusion_pattern(config.model.fusion.layers, config.model.fusion.stride),
                mlm_owner=mlm_owner(state), words=word_embedding_keys(state))
    momentum = any(key.split(".")[0].endswith(MOMENTUM_SUFFIX) for key in state)
    layout = layout_of_config(config, momentum=momentum)
    result = OfficialImport(config=config, model=model or detected, naming=official_naming(state),
                            momentum=momentum, state_dict={}, sources={})
    for key, value in state.items():
        if key in QUEUE_KEYS:
            result.queue[QUEUE_KEYS[key]] = value
        elif key == TEMPERATURE:
            place(result, layout, key, TEMPERATURE, value.reshape(1), config_name)  # () -> (1,)
        elif isinstance(found := route(key, value, plan), Dropped):
            result.dropped[key] = found.reason
        elif isinstance(found, Tied):
            settle_tie(result, state, key, found)
        else:
            place(result, layout, key, found.target, found.tensor, config_name)
    finish_queue(result, config)
    result.missing = [name for name in layout.shapes if name not in result.state_dict]
    log_summary(result)
    return result


def place(result: OfficialImport, layout: Layout, key: str, target: str, tensor: torch.Tensor, config_name: str) -> None:
    if target not in layout.shapes:
        raise OfficialCheckpointError(f"{key} maps to {target}, which the model of config {config_name!r} does not "
                                      "have; the checkpoint and the config describe different models")
    if target in result.sources:
        raise OfficialCheckpointError(f"{key} and {result.sources[target]} both map to {target}")
    if tuple(tensor.shape) != tuple(layout.shapes[target]):
        raise OfficialCheckpointError(
            f"{key} is {tuple(tensor.shape)} but {target} of config {config_name!r} is "
            f"{tuple(layout.shapes[target])}; {shape_hint(target, tensor.shape)}")
    result.state_dict[target] = tensor
    result.sources[target] = key


def shape_hint(target: str, shape: torch.Size) -> str:
    for name in SIZE_PRESETS:
        for momentum in (False, True):
            layout = preset_layout(name, momentum)
            if target in layout.shapes and tuple(layout.shapes[target]) == tuple(shape):
                return f"config {name!r} has that shape"
    return "set the model sizes of the config to the checkpoint's"


_PRESET_LAYOUTS: dict[tuple[str, bool], Layout] = {}


def preset_layout(name: str, momentum: bool) -> Layout:
    if (name, momentum) not in _PRESET_LAYOUTS:
        _PRESET_LAYOUTS[name, momentum] = layout_of_config(load_config(name), momentum=momentum)
    return _PRESET_LAYOUTS[name, momentum]


def settle_tie(result: OfficialImport, state: Mapping[str, torch.Tensor], key: str, tie: Tied) -> None:
    """A tensor the official model shares with another: equal values are stored once; else dropped or refused."""
    canonical = state.get(tie.canonical)
    if canonical is not None and canonical.shape == state[key].shape and torch.equal(canonical, state[key]):
        result.tied[key] = tie.canonical
        return
    if tie.fallback is not None:
        diff = "absent" if canonical is None else (
            f"max abs difference {(canonical.float() - state[key].float()).abs().max().item():.3g}"
            if canonical.shape == state[key].shape else f"shape {tuple(canonical.shape)}")
        result.dropped[key] = f"{tie.fallback} ({tie.canonical}: {diff})"
        return
    raise OfficialCheckpointError(f"{key} must equal {tie.canonical} (the official model ties them) but the values "
                                  "differ; the checkpoint was not written by the official code")


def finish_queue(result: OfficialImport, config: Config) -> None:
    """The official queue as FeatureQueue buffers: ids (Q,), ptr (), and every slot counted as filled."""
    queue = result.queue
    if not queue:
        return
    if set(queue) != set(QUEUE_KEYS.values()):
        absent = sorted(key for key, name in QUEUE_KEYS.items() if name not in queue)
        raise OfficialCheckpointError(f"the checkpoint holds part of the ITC queue only ({', '.join(absent)} absent)")
    embed = config.model.embed_dim
    if queue["image"].shape[0] != embed or queue["text"].shape != queue["image"].shape:
        raise OfficialCheckpointError(f"image_queue is {tuple(queue['image'].shape)} and text_queue "
                                      f"{tuple(queue['text'].shape)}; both must be (model.embed_dim={embed}, Q)")
    queue["ids"] = queue["ids"].reshape(-1)  # (1, Q) -> (Q,)
    queue["ptr"] = queue["ptr"].reshape(())  # (1,) -> ()
    queue[QUEUE_FILLED] = torch.tensor(queue["image"].shape[1])  # the official loss reads every slot


def log_summary(result: OfficialImport) -> None:
    reasons = Counter(re.sub(r"\d+", "N", reason) for reason in result.dropped.values())
    log.info("official %s checkpoint (%s naming): %d tensors mapped, %d tied, %d dropped, %d new in this model; "
             "image size %d", result.model, result.naming, len(result.sources), len(result.tied),
             len(result.dropped), len(result.missing), result.config.model.vision.image_size)
    for reason, count in reasons.most_common():
        log.info("  dropped %d: %s", count, reason)
    if result.missing:
        log.info("  new (kept as initialised; momentum copies from their online twin): %s", preview(result.missing))


# ---------------------------------------------------------------------------------------------
# A model from the converted checkpoint


@torch.no_grad()
def build_model(converted: OfficialImport, *, seed: int = 0) -> MPLUG:
    """MPLUG of the fitted config holding the checkpoint's tensors; the rest as initialised with `seed`,
    momentum tensors the checkpoint lacks copied from their online twins."""
    torch.manual_seed(seed)
    model = MPLUG(converted.config.model, momentum=converted.momentum)
    result = model.load_state_dict(converted.state_dict, strict=False)
    if result.unexpected_keys:
        raise OfficialCheckpointError(f"converted tensors the model does not hold: {preview(result.unexpected_keys)}")
    own = model.state_dict()
    for name in converted.missing:
        if name.startswith(MOMENTUM_PREFIX):
            own[name].copy_(own[name[len(MOMENTUM_PREFIX):]])
    return model.eval()


def read_official_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official `.pth` (under `model` or `module`, DDP's `module.` prefix removed)."""
    return strip_modelscope_prefix(read_state_dict(path))


def write_official_package(
    converted: OfficialImport, output: PathLike, tokenizer, *, source: str, extra: dict | None = None, seed: int = 0
) -> Path:
    """The converted checkpoint as a model package; its report and ITC queue ride along as side files."""
    model = build_model(converted, seed=seed)
    report = {"source": source, **converted.report()}
    files = {REPORT_FILE: (json.dumps(report, indent=1) + "\n").encode()}
    if converted.queue:
        files[QUEUE_FILE] = save_tensors({name: t.contiguous() for name, t in converted.queue.items()})
    summary = {"source": source, "model": converted.model, "naming": converted.naming,
               "mapped": len(converted.sources), "tied": len(converted.tied), "dropped": len(converted.dropped),
               "new": len(converted.missing), "report": REPORT_FILE}
    return export_package(output, model, converted.config, tokenizer,
                          extra={"official": summary, **(extra or {})}, files=files)
