"""Building an mPLUG model from its config, with the local weights the config names."""

from __future__ import annotations

from pretrain.config.schema import ModelConfig
from pretrain.models.mplug import MPLUG
from pretrain.models.weights import load_pretrained_parts


def build_mplug(cfg: ModelConfig, *, momentum: bool = True) -> MPLUG:
    """A new model; `cfg.vision.weights` and `cfg.text.weights`, when set, are loaded into it."""
    model = MPLUG(cfg, momentum=momentum)
    load_pretrained_parts(model, cfg)
    return model
