"""A pretrained MPLUG at another image resolution: the ViT's position embeddings resized."""

from __future__ import annotations

import logging

from pretrain.config.schema import Config
from pretrain.models.mplug import MPLUG
from pretrain.models.vision import resize_position_embedding

log = logging.getLogger(__name__)

POSITION_EMBEDDING = "vit.pos_embed"  # in the vision tower and its momentum copy


def at_resolution(model: MPLUG, config: Config) -> MPLUG:
    """`model`'s weights in a model built for `config` (whose vision.image_size may differ)."""
    vision = config.model.vision
    if model.cfg.vision.image_size == vision.image_size:
        return model
    if vision.image_size % vision.patch_size:
        raise ValueError(f"image_size {vision.image_size} is not a multiple of the patch size {vision.patch_size}; "
                         f"use e.g. {vision.image_size // vision.patch_size * vision.patch_size}")
    grid = vision.image_size // vision.patch_size
    state = {name: (resize_position_embedding(value, grid) if name.endswith(POSITION_EMBEDDING) else value)
             for name, value in model.state_dict().items()}
    resized = MPLUG(config.model, momentum=model.momentum is not None)
    resized.load_state_dict(state, strict=True)
    log.info("position embeddings resized from %d to %d pixels (%dx%d patches)", model.cfg.vision.image_size,
             vision.image_size, grid, grid)
    return resized
