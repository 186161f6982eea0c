"""Typed configuration: nested dataclasses built from plain dicts, with errors that name the valid keys.

A config is a tree of dataclasses. `from_dict` builds one from a mapping (YAML, JSON or the
command line), rejecting unknown keys and values of the wrong type; `apply_overrides` applies
dotted `key=value` strings such as `model.fusion.stride=3` to a mapping before it is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is not what the schema allows."""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {_describe(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: null is not allowed, expected {_describe(tp)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not a {_describe(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1]
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping with keys {field_names(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r} in the config schema")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build the dataclass `cls` from `data`; missing keys keep their defaults."""
    hints = get_type_hints(cls)
    valid = field_names(cls)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = path or "config"
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(valid)}"
        )
    kwargs = {}
    for name in valid:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain mappings and lists, ready for YAML or JSON."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.fusion.stride=3` -> (['model', 'fusion', 'stride'], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part; write it as dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply dotted overrides to the mapping `data` for the schema `cls`; keys are checked on the way."""
    for text in overrides:
        parts, value = parse_override(text)
        node_cls, node, walked = cls, data, []
        for part in parts[:-1]:
            walked.append(part)
            hints = get_type_hints(node_cls)
            if part not in hints or not dataclasses.is_dataclass(_unwrap_optional(hints[part])):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(walked)} is not a section; "
                    f"sections here are {_sections(node_cls) or 'none'}"
                )
            node_cls = _unwrap_optional(hints[part])
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
        leaf = parts[-1]
        if leaf not in field_names(node_cls):
            where = ".".join(parts[:-1]) or "config"
            raise ConfigError(
                f"override {text!r}: {where} has no key {leaf!r}; valid keys are {', '.join(field_names(node_cls))}"
            )
        node[leaf] = value
    return data


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _sections(cls: type) -> str:
    hints = get_type_hints(cls)
    return ", ".join(n for n in field_names(cls) if dataclasses.is_dataclass(_unwrap_optional(hints[n])))
