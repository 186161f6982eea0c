"""Typed configuration: presets, dotted overrides, and errors that name what is valid."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config, preset_names


def test_every_size_has_a_shipped_preset():
    assert {"tiny", "base", "large", "huge"} <= set(preset_names())


def test_dotted_override_sets_a_nested_value():
    config = load_config("base", ["model.fusion.stride=2", "train.lr=3e-4"])
    assert config.model.fusion.stride == 2
    assert config.train.lr == pytest.approx(3e-4)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys are layers, stride"):
        load_config("base", ["model.fusion.strid=3"])


def test_unknown_section_names_the_sections():
    with pytest.raises(ConfigError, match="sections here are model, objectives, data, train"):
        load_config("base", ["modle.fusion.stride=3"])


def test_wrong_type_is_rejected_with_the_value_seen():
    with pytest.raises(ConfigError, match=r"model\.fusion\.stride: expected an integer, got 'three'"):
        load_config("base", ["model.fusion.stride=three"])


def test_choice_outside_its_set_is_rejected():
    with pytest.raises(ConfigError, match="'fp8' is not one of 'bf16' | 'fp16' | 'fp32'"):
        load_config("base", ["train.precision=fp8"])


def test_unknown_key_in_a_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("model:\n  fusion:\n    layers: 4\n  visoin: {}\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'visoin'"):
        load_config(str(path))


def test_yaml_file_config_is_read(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("model:\n  fusion: {layers: 4, stride: 2}\n")
    config = load_config(str(path))
    assert (config.name, config.model.fusion.layers, config.model.fusion.stride) == ("custom", 4, 2)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="choose one of .*base.*huge.*large.*tiny"):
        load_config("gigantic")
