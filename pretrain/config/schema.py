"""The configuration schema of an mPLUG model and its pretraining run.

Every preset under `presets/` is an instance of `Config` written as YAML. Sizes are explicit so a
model is built from its config alone, with no hub lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class VisionConfig:
    """A CLIP ViT from timm, given by its architecture name and explicit sizes."""

    arch: str = "vit_base_patch16_clip_224"  # timm architecture the sizes below override
    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI CLIP's activation; LAION ViT-H/14 uses plain GELU
    drop_path: float = 0.0
    weights: str | None = None  # local state dict, timm or OpenAI layout


@dataclass
class TextConfig:
    """BERT sizes shared by the text encoder, the fusion layers and the decoder."""

    vocab_size: int = 30522
    width: int = 768
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    encoder_layers: int = 6
    decoder_layers: int = 12
    decoder_extra_tokens: int = 0  # ids after the text vocabulary known to the decoder only (grounding's box bins)
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    weights: str | None = None  # local BERT directory in the Hugging Face layout
    tokenizer: str | None = None  # local tokenizer directory (BertTokenizerFast)


@dataclass
class FusionConfig:
    """F fusion layers; layer j is a connected-attention layer when j > 0 and j % stride == 0."""

    layers: int = 6
    stride: int = 3


@dataclass
class VideoConfig:
    """mPLUG-2's local temporal modules: two per ViT block (before and after its attention)."""

    temporal: bool = False  # off: the ViT sees every frame alone (mPLUG)
    kernel: int = 3  # frames the depthwise temporal convolution spans; odd, so the clip keeps its length
    ratio: float = 0.5  # down-projection width / ViT width


@dataclass
class UniversalConfig:
    """mPLUG-2's universal layers: the last `layers` text-encoder layers, shared with the vision side."""

    layers: int = 0  # 0 for mPLUG; at most text.encoder_layers
    latents: int = 50  # learnable queries that read the visual tokens


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    universal: UniversalConfig = field(default_factory=UniversalConfig)
    vision_dropout: float = 0.1  # after the vision->text width projection, when widths differ
    embed_dim: int = 256  # ITC projection size
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    momentum: float = 0.995  # EMA decay of the momentum copies
    queue_size: int = 65536  # ITC feature queue; must be divisible by the global batch
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass


@dataclass
class ObjectivesConfig:
    itc: bool = True
    itm: bool = True
    mlm: bool = True
    prefix_lm: bool = True
    distill: bool = True  # momentum soft targets for ITC and MLM
    alpha: float = 0.4  # weight of the momentum targets once ramped up
    alpha_warmup_steps: int = 2000  # alpha rises linearly from 0 over these steps
    mlm_probability: float = 0.15
    mlm_mask_ratio: float = 0.8  # of the chosen tokens: [MASK]
    mlm_random_ratio: float = 0.1  # of the chosen tokens: a random token; the rest are kept


@dataclass
class DataConfig:
    max_text_length: int = 40
    train_scale_min: float = 0.2  # RandomResizedCrop lower scale in pretraining
    randaugment: bool = True  # RandAugment(2, 7) in training
    workers: int = 4  # dataloader processes per rank
    shuffle_buffer: int = 1000  # raw samples per dataloader worker; 0 keeps shard order (exact resume)
    frames: int = 16  # frames sampled per video clip
    video_batch_size: int = 0  # clips per rank per pretraining step; 0: train.batch_size


@dataclass
class TrainConfig:
    batch_size: int = 64  # micro-batch per rank
    grad_accumulation: int = 1
    max_steps: int = 100000
    lr: float = 1e-4
    vision_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 2000
    warmup_lr: float = 1e-6
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    keep_checkpoints: int = 3  # the newest K are kept
    package_every: int = 5000  # steps between model packages (one is also written at the end)
    max_nonfinite: int = 5  # non-finite losses in a row before the run checkpoints and stops


@dataclass
class Config:
    name: str = "base"
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
