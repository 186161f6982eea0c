"""Named presets shipped with the package, loaded with dotted overrides applied."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import yaml

from pretrain.config.schema import Config
from pretrain.config.typed import ConfigError, apply_overrides, from_dict

PRESET_DIR = "presets"


def preset_names() -> list[str]:
    folder = resources.files("pretrain.config") / PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def preset_dict(name: str) -> dict:
    """The raw mapping of a preset name, or of a YAML file when `name` is a path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        if not Path(name).is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        return read_yaml(name)
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)} or a YAML file")
    with resources.as_file(resources.files("pretrain.config") / PRESET_DIR / f"{name}.yaml") as path:
        return read_yaml(path)


def load_config(name: str, overrides: Iterable[str] = ()) -> Config:
    """The preset (or YAML file) `name` with `key=value` overrides applied and every value checked."""
    data = apply_overrides(Config, preset_dict(name), overrides)
    data.setdefault("name", Path(name).stem if name.endswith((".yaml", ".yml")) else name)
    return from_dict(Config, data)
