"""mPLUG: a CLIP ViT, a BERT text encoder, the skip-connected fusion and a BERT decoder, with the
ITC projections, the ITM head, the MLM head and momentum copies for distillation.

    images --vision--> v (B, Lv, D) ----------------------------\
    text ids --text_encoder--> l (B, Lt, D) --fusion(l, v)--> [v ; l] --decoder--> tokens
    ITC: vision_proj(v[:, 0]) . text_proj(l[:, 0]) / temp        ITM: itm_head(fused l[:, 0])

mPLUG-2 is the same model with two additions, both off by default: local temporal modules in the
ViT's blocks for videos (`model.video.temporal`), and universal layers after the vision encoder
that share the text encoder's last layers (`model.universal.layers`). Images and videos both go
through `encode_visual`, so every objective and task runs on either.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.schema import ModelConfig
from pretrain.models.fusion import FusionEncoder, FusionOutput
from pretrain.models.momentum import MomentumCopies
from pretrain.models.text import INIT_STD, MLMHead, TextDecoder, TextEncoder, init_bert_weights
from pretrain.models.universal import UniversalLayers
from pretrain.models.vision import VisionEncoder

log = logging.getLogger(__name__)

# The online modules whose momentum copies produce the ITC and MLM distillation targets; a model
# with universal layers copies `universal` too, after these.
MOMENTUM_MODULES = ("vision", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head")
# How `mplug model summary` groups parameters: a parameter belongs to the group naming the longest
# prefix of its name (`vision.temporal.*` is `temporal`, the rest of `vision.*` is `vision`); groups
# the model lacks are left out.
MODULE_GROUPS = {
    "vision": ("vision",),
    "temporal": ("vision.temporal",),
    "text_encoder": ("text_encoder",),
    "universal": ("universal",),
    "fusion": ("fusion",),
    "decoder": ("decoder",),
    "heads": ("vision_proj", "text_proj", "itm_head", "mlm_head", "temp"),
}


class MPLUG(nn.Module):
    def __init__(self, cfg: ModelConfig, *, momentum: bool = True):
        super().__init__()
        self.cfg = cfg
        width = cfg.text.width
        if not 0 <= cfg.universal.layers <= cfg.text.encoder_layers:
            raise ValueError(
                f"universal.layers={cfg.universal.layers} must lie between 0 and text.encoder_layers="
                f"{cfg.text.encoder_layers}: the universal layers are the text encoder's last layers"
            )
        self.vision = VisionEncoder(cfg.vision, width, cfg.vision_dropout, cfg.video)
        self.text_encoder = TextEncoder(cfg.text)
        self.universal = UniversalLayers(cfg.text, cfg.universal) if cfg.universal.layers else None
        self.fusion = FusionEncoder(cfg.text, cfg.fusion)
        self.decoder = TextDecoder(cfg.text)
        self.mlm_head = MLMHead(cfg.text, self.text_encoder.embeddings.word_embeddings)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        init_bert_weights(nn.ModuleList([self.vision_proj, self.text_proj, self.itm_head]), INIT_STD)
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse.
        self.temp = nn.Parameter(torch.full((1,), cfg.temp))
        self.momentum = MomentumCopies(self.momentum_sources()) if momentum else None
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        log.info("fusion pattern (%d layers, stride %d): %s", cfg.fusion.layers, cfg.fusion.stride,
                 ", ".join(self.fusion.pattern))
        if self.universal is not None or self.vision.temporal is not None:
            log.info("mPLUG-2: temporal modules %s; universal layers: the last %d text-encoder layers, %d latents",
                     "on" if self.vision.temporal is not None else "off", cfg.universal.layers, cfg.universal.latents)

    def momentum_sources(self) -> dict[str, nn.Module]:
        sources = {name: getattr(self, name) for name in MOMENTUM_MODULES}
        if self.universal is not None:
            sources["universal"] = self.universal
        return sources

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the temperature in its range and move every momentum copy toward its online module."""
        self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)
        if self.momentum is not None:
            self.momentum.ema_update(self.momentum_sources(), self.cfg.momentum)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        for stack in (self.text_encoder, self.universal, self.fusion, self.decoder):
            if stack is not None:
                stack.grad_checkpointing = enable

    def temperature(self) -> torch.Tensor:
        """The ITC temperature, clamped to [temp_min, temp_max]."""
        return self.temp.clamp(self.cfg.temp_min, self.cfg.temp_max)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) or videos (B, T, 3, H, W) -> visual states (B, Lv, D); see `encode_visual`."""
        return encode_visual(self, pixels)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)  # (B, Lt, D)

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor) -> FusionOutput:
        return self.fusion(text, text_mask, vision)

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.decoder(input_ids, attention_mask, memory, memory_mask)  # (B, L, V)


def encode_visual(towers: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Visual states (B, Lv, D), after the universal layers when the model has them.

    `towers` is the model or its momentum copies. Images (B, 3, H, W) give Lv = 1 + N; videos
    (B, T, 3, H, W) give Lv = 1 + T*N: the frames' mean [CLS], then every frame's patches.
    """
    vision = towers.vision(pixels)  # (B, Lv, D)
    universal = getattr(towers, "universal", None)
    if universal is None:
        return vision
    layers = towers.text_encoder.layers
    return universal(vision, layers[len(layers) - universal.num_layers:])  # (B, Lv, D)


def image_feature(towers: nn.Module, vision: torch.Tensor) -> torch.Tensor:
    """Normalised ITC embedding (B, E) of the vision [CLS]; `towers` is the model or its momentum copies."""
    return F.normalize(towers.vision_proj(vision[:, 0]), dim=-1)


def text_feature(towers: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Normalised ITC embedding (B, E) of the text [CLS]."""
    return F.normalize(towers.text_proj(text[:, 0]), dim=-1)
