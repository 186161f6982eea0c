"""Per-rank memory estimate: ZeRO arithmetic, activations, and the printed table."""

from __future__ import annotations

import math

import pytest

from pretrain.config import load_config
from pretrain.flops import LayerShape
from pretrain.memory_estimate import (
    GIB,
    ParameterCounts,
    estimate_memory,
    format_memory_estimate,
    layer_activation_bytes,
    model_state_bytes,
    parameter_counts,
)

BILLION = 10**9


@pytest.fixture(scope="module")
def huge_counts() -> ParameterCounts:
    return parameter_counts(load_config("huge"))


@pytest.mark.parametrize(
    ("stage", "params", "grads", "optimizer"),
    [
        (0, 2, 2, 12),  # bf16 parameters and gradients, fp32 master + two fp32 moments
        (1, 2, 2, 12 / 8),
        (2, 2, 2 / 8, 12 / 8),
        (3, 2 / 8, 2 / 8, 12 / 8),
    ],
)
def test_zero_stages_partition_bytes_per_parameter_over_8_ranks(stage, params, grads, optimizer):
    states = model_state_bytes(
        ParameterCounts(BILLION), precision="bf16", zero_stage=stage, world_size=8
    )
    assert states.parameters == params * BILLION
    assert states.gradients == grads * BILLION
    assert states.optimizer == optimizer * BILLION


def test_zero3_on_8_ranks_holds_16_over_8_bytes_per_parameter():
    states = model_state_bytes(
        ParameterCounts(BILLION), precision="bf16", zero_stage=3, world_size=8
    )
    assert states.total == 16 / 8 * BILLION


@pytest.mark.parametrize(("params", "gigabytes"), [(350e6, 5.6), (600e6, 9.6), (1.1e9, 17.6)])
def test_model_states_match_performance_md_adam_figures(params, gigabytes):
    # performance.md's "Adam state" is 16 bytes per parameter, decimal GB: the whole model state
    # of mixed-precision AdamW on one rank (2 + 2 + 4 + 4 + 4).
    states = model_state_bytes(
        ParameterCounts(int(params)), precision="bf16", zero_stage=0, world_size=1
    )
    assert states.total / 1e9 == pytest.approx(gigabytes)


def test_fp32_training_keeps_no_master_copy():
    states = model_state_bytes(
        ParameterCounts(BILLION), precision="fp32", zero_stage=0, world_size=1
    )
    assert (states.parameters, states.gradients, states.optimizer) == (
        4 * BILLION,
        4 * BILLION,
        8 * BILLION,
    )


def test_momentum_copies_are_whole_under_zero2_and_partitioned_under_zero3():
    counts = ParameterCounts(BILLION, momentum=BILLION // 2)
    zero2 = model_state_bytes(counts, precision="bf16", zero_stage=2, world_size=8)
    zero3 = model_state_bytes(counts, precision="bf16", zero_stage=3, world_size=8)
    assert zero2.momentum == BILLION  # 0.5e9 parameters at 2 bytes, on every rank
    assert zero3.momentum == BILLION / 8


def test_a_plain_16_bit_layer_keeps_34_nd_plus_5_a_n2_bytes():
    n, d, heads = 100, 64, 4
    layer = LayerShape(n, d, heads, ffn_width=4 * d)
    math_kernel = layer_activation_bytes(layer, bytes_per_value=2, dropout=True, attention="math")
    fused_kernel = layer_activation_bytes(layer, bytes_per_value=2, dropout=True, attention="fused")
    assert math_kernel == n * d * (34 + 5 * heads * n / d)  # 417,600 bytes
    assert fused_kernel == 34 * n * d  # flash / memory-efficient SDPA keep no n x n scores


def test_cross_attention_keeps_k_and_v_of_the_memory():
    n, m, d = 40, 257, 64
    plain = LayerShape(n, d, 1, ffn_width=4 * d)
    reading = LayerShape(n, d, 1, ffn_width=4 * d, memory=m)
    extra = layer_activation_bytes(
        reading, bytes_per_value=2, dropout=True
    ) - layer_activation_bytes(plain, bytes_per_value=2, dropout=True)
    assert (
        extra == 4 * n * d * 2 + 2 * m * d * 2 + n * d
    )  # Q input, Q, output input, LN; K, V; mask


def test_activations_grow_linearly_with_the_micro_batch():
    config = load_config("base")
    counts = ParameterCounts(BILLION)
    estimates = [estimate_memory(config, micro_batch=b, counts=counts) for b in (1, 2, 4, 8)]
    totals = [e.total_bytes for e in estimates]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert estimates[3].activations.total == pytest.approx(8 * estimates[0].activations.total)


def test_activation_checkpointing_lowers_the_activations(huge_counts):
    config = load_config("huge")
    kept = estimate_memory(config, world_size=8, grad_checkpointing=False, counts=huge_counts)
    recomputed = estimate_memory(config, world_size=8, grad_checkpointing=True, counts=huge_counts)
    assert recomputed.activations.total < kept.activations.total / 5  # 4.4 vs 31.6 GiB
    assert kept.activations.recompute == 0
    assert recomputed.activations.recompute > 0


def test_the_math_attention_kernel_keeps_more_than_the_fused_one():
    config = load_config("base")
    counts = ParameterCounts(BILLION)
    fused = estimate_memory(config, counts=counts)
    scores = estimate_memory(config, counts=counts, attention="math")
    assert scores.activations.total > fused.activations.total


def test_huge_on_8_ranks_at_zero3(huge_counts):
    estimate = estimate_memory(load_config("huge"), world_size=8, zero_stage=3, counts=huge_counts)
    trained, momentum = huge_counts.trainable, huge_counts.momentum
    assert 0.95e9 <= trained <= 1.2e9
    assert estimate.states.parameters == trained * 2 / 8
    assert estimate.states.gradients == trained * 2 / 8
    assert estimate.states.optimizer == trained * 12 / 8
    assert estimate.states.momentum == momentum * 2 / 8
    assert estimate.buffers == 2 * 256 * 65536 * 2 + 65536 * 8  # ITC queues in bf16, int64 ids
    assert math.isfinite(estimate.total_bytes)
    # The figure of the formulas in pretrain/memory_estimate.py: a change means they changed.
    assert estimate.total_bytes / GIB == pytest.approx(6.49, abs=0.01)
    assert estimate.activations.total / GIB == pytest.approx(4.45, abs=0.01)


def test_the_table_lists_every_part_and_the_total(huge_counts):
    estimate = estimate_memory(load_config("huge"), world_size=8, zero_stage=3, counts=huge_counts)
    table = format_memory_estimate(estimate)
    for label in (
        "parameters",
        "momentum copies",
        "gradients",
        "optimizer states",
        "activations",
        "vision",
        "text encoder",
        "fusion",
        "decoder",
        "heads",
        "recompute",
        "ITC queue",
    ):
        assert label in table
    assert "8 rank(s), ZeRO stage 3, bf16, micro-batch 64" in table
    assert table.splitlines()[-2].split() == ["total", f"{estimate.total_bytes / GIB:.2f}"]


def test_an_unknown_zero_stage_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="ZeRO stage 4 is not one of 0, 1, 2, 3"):
        model_state_bytes(ParameterCounts(BILLION), precision="bf16", zero_stage=4, world_size=8)


def test_a_world_of_no_ranks_is_refused():
    with pytest.raises(ValueError, match="world size must be >= 1"):
        model_state_bytes(ParameterCounts(BILLION), precision="bf16", zero_stage=0, world_size=0)
