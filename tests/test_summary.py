"""`mplug model summary`: parameter counts of every size against the reference architecture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain.config import load_config
from pretrain.models.summary import summarize

# The reference architecture's counts (CLIP ViT + BERT text encoder, fusion, decoder and heads).
REFERENCE_PARAMS = {"base": 347e6, "large": 566e6}


@pytest.mark.parametrize("name", ["base", "large"])
def test_total_is_within_3_percent_of_the_reference(name):
    total = summarize(load_config(name)).total_params
    assert abs(total - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.03


def test_huge_lies_between_0_95_and_1_2_billion():
    assert 0.95e9 <= summarize(load_config("huge")).total_params <= 1.2e9


def test_base_fusion_pattern_has_one_connected_layer_fourth():
    assert summarize(load_config("base")).fusion_pattern == ["co", "co", "co", "connected", "co", "co"]


def test_large_fusion_never_fires_a_connected_layer():
    assert summarize(load_config("large")).fusion_pattern == ["co"] * 6


def test_modules_add_up_and_momentum_is_counted_apart():
    summary = summarize(load_config("base"))
    assert sum(summary.params_by_module.values()) == summary.total_params
    # Momentum copies: vision, both projections, text encoder, fusion and the MLM head transform.
    by = summary.params_by_module
    assert by["vision"] + by["text_encoder"] + by["fusion"] < summary.momentum_params < summary.total_params


def test_cli_prints_the_json_keys():
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "model", "summary", "base", "--json"],
        capture_output=True, text=True, check=True,
    )
    payload = json.loads(result.stdout)
    assert set(payload) >= {"name", "total_params", "params_by_module", "fusion_pattern"}
    assert payload["name"] == "base"
    assert set(payload["params_by_module"]) == {"vision", "text_encoder", "fusion", "decoder", "heads"}
    assert payload["fusion_pattern"][3] == "connected"
