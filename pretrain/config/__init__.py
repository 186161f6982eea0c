"""Typed configuration and the shipped presets."""

from pretrain.config.presets import load_config, preset_names
from pretrain.config.schema import (
    Config,
    DataConfig,
    FusionConfig,
    ModelConfig,
    ObjectivesConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from pretrain.config.typed import ConfigError, from_dict, to_dict

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "FusionConfig",
    "ModelConfig",
    "ObjectivesConfig",
    "TextConfig",
    "TrainConfig",
    "VisionConfig",
    "from_dict",
    "load_config",
    "preset_names",
    "to_dict",
]
