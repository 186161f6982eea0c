"""Analytic FLOPs of a training sample: the per-layer formula, the reference figures, MFU."""

from __future__ import annotations

import pytest

from pretrain.config import VisionConfig, load_config
from pretrain.flops import (
    ForwardGFLOP,
    SampleFlops,
    TextLengths,
    flops_per_sample,
    fusion_layer_flops,
    peak_flops_for,
    resolve_peak_flops,
    transformer_layer_flops,
    vit_forward_flops,
)

GIGA = 1e9
GMAC = 2 * GIGA  # one multiply-accumulate is two FLOPs
VIT_B16 = VisionConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12)
VIT_L14 = VisionConfig(image_size=224, patch_size=14, width=1024, depth=24, heads=16)


def test_plain_layer_costs_24nd2_plus_4n2d():
    # n = 10 tokens, d = 8: 24 * 10 * 64 + 4 * 100 * 8
    assert transformer_layer_flops(10, 8) == 15_360 + 3_200


def test_ffn_width_replaces_the_16nd2_term():
    # f = 16 = 2d: 8nd^2 (Q, K, V, O) + 4n^2d (scores, weighted sum) + 4ndf (two FFN matmuls)
    assert transformer_layer_flops(10, 8, ffn_width=16) == 5_120 + 3_200 + 5_120


def test_vit_b16_at_224_is_35_1_gflop_forward():
    assert vit_forward_flops(VIT_B16) / GIGA == pytest.approx(35.1, rel=0.01)


def test_vit_l14_at_224_is_162_gflop_forward():
    assert vit_forward_flops(VIT_L14) / GIGA == pytest.approx(162, rel=0.01)


@pytest.mark.parametrize(
    ("visual", "kind", "gmac"),
    [(257, "co", 0.65), (257, "connected", 2.24), (577, "co", 1.05), (577, "connected", 4.95)],
)
def test_fusion_layer_matches_the_reference_gmac(visual, kind, gmac):
    # reference/mplug.md: d = 768, 40 text tokens, quoted to two decimals
    flops = fusion_layer_flops(kind, 40, visual, 768, 4 * 768)
    assert flops / GMAC == pytest.approx(gmac, abs=0.005)


@pytest.mark.parametrize(
    ("name", "overrides", "gflop"),
    [
        ("base", ["model.vision.image_size=224"], 328),
        ("base", [], 405),  # 256 px
        ("large", [], 818),
    ],
)
def test_faithful_recipe_matches_performance_md_with_its_prefix_lm_split(name, overrides, gflop):
    # performance.md counts 30 text tokens and a PrefixLM that runs the prefix (L/2) through the
    # text encoder and fusion and the target (L/2) through the decoder, padding trimmed.
    sample = flops_per_sample(
        load_config(name, overrides), text_tokens=30, prefix_tokens=15, target_tokens=15
    )
    assert sample.model_gflop == pytest.approx(gflop, rel=0.005)


def test_prefix_lm_at_the_padded_length_costs_more_than_the_reference_assumes():
    # Our PrefixLM masks the prefix inside the full caption, and the decoder reads a sequence of
    # that length: at 30 tokens base costs 426.7 GFLOP per sample, not performance.md's 405.
    config = load_config("base")
    padded = flops_per_sample(config, text_tokens=30)
    trimmed = flops_per_sample(config, text_tokens=30, prefix_tokens=15, target_tokens=15)
    assert padded.model_gflop == pytest.approx(426.7, abs=0.1)
    assert padded.model_gflop - trimmed.model_gflop == pytest.approx(21.4, abs=0.1)


def tiny_by_hand() -> dict[str, int]:
    """Forward FLOPs of each part of the tiny preset for one sample, written out from its YAML."""
    n, lv, d, f, vocab, embed = 24, 65, 64, 128, 1000, 32  # L, (64/8)^2 + 1, text sizes, ITC size
    itc_keys = 8 + 64  # the local micro-batch and the queue

    def attention(queries: int, keys: int) -> int:
        return 4 * queries * d * d + 4 * keys * d * d + 4 * queries * keys * d

    def ffn(tokens: int) -> int:
        return 2 * 2 * tokens * d * f

    co = attention(n, n) + attention(n, lv) + ffn(n)
    connected = attention(n + lv, n + lv) + ffn(n + lv)
    return {
        "vit_blocks": 2 * (24 * lv * d**2 + 4 * lv**2 * d),  # ViT width 64, FFN 4d
        "patch_embedding": 2 * (lv - 1) * (3 * 8 * 8) * d,
        "encoder": 2 * (attention(n, n) + ffn(n)),
        "fusion": 2 * co + connected,  # pattern co, co, connected
        "decoder": 2 * (attention(n, n) + attention(n, lv + n) + ffn(n)),  # memory [v ; l]
        "vocabulary_head": 2 * n * d * d + 2 * n * d * vocab,  # transform, logits at every position
        "itc": 2 * (2 * d * embed) + 2 * (2 * embed * itc_keys),  # two projections, i2t and t2i
        "itm": 3 * (2 * d * 2),  # three pairs per sample
    }


def test_tiny_step_matches_a_hand_count():
    """Every pass `MPLUGPretraining.forward` runs for one tiny sample."""
    part = tiny_by_hand()
    vision = part["vit_blocks"] + part["patch_embedding"]
    with_grad = (
        vision  # once
        + 3 * part["encoder"]  # ITC/ITM, MLM, PrefixLM
        + 5 * part["fusion"]  # 3 ITM pairs, MLM, PrefixLM
        + part["decoder"]
        + 2 * part["vocabulary_head"]  # MLM, PrefixLM
        + part["itc"]
        + part["itm"]
    )
    # ITC targets (vision, text encoder, projections, similarities), MLM distillation
    momentum = vision + 2 * part["encoder"] + part["fusion"] + part["vocabulary_head"] + part["itc"]
    sample = flops_per_sample(load_config("tiny"))
    assert sample.forward.with_grad * GIGA == pytest.approx(with_grad, rel=1e-12)
    assert sample.forward.momentum * GIGA == pytest.approx(momentum, rel=1e-12)
    assert sample.model_gflop * GIGA == pytest.approx(3 * with_grad + momentum, rel=1e-12)
    assert sample.hardware_gflop == sample.model_gflop  # tiny does not checkpoint


def test_checkpointing_adds_one_forward_of_the_trained_blocks_to_hfu_only():
    part = tiny_by_hand()
    plain = flops_per_sample(load_config("tiny"))
    recomputing = flops_per_sample(load_config("tiny", ["model.grad_checkpointing=true"]))
    blocks_with_grad = (
        part["vit_blocks"] + 3 * part["encoder"] + 5 * part["fusion"] + part["decoder"]
    )
    assert recomputing.model_gflop == plain.model_gflop
    assert recomputing.recompute_gflop * GIGA == pytest.approx(blocks_with_grad, rel=1e-12)
    assert recomputing.hardware_gflop == pytest.approx(
        plain.model_gflop + recomputing.recompute_gflop
    )


def test_switching_off_distillation_drops_the_mlm_momentum_pass():
    with_distill = flops_per_sample(load_config("tiny"))
    without = flops_per_sample(load_config("tiny", ["objectives.distill=false"]))
    assert without.forward.with_grad == with_distill.forward.with_grad
    assert without.forward.momentum < with_distill.forward.momentum


def test_text_length_defaults_to_max_text_length():
    assert flops_per_sample(load_config("base")).lengths == TextLengths(40, 40, 40)


def test_a_text_length_below_one_is_refused():
    with pytest.raises(ValueError, match="text length must be >= 1"):
        flops_per_sample(load_config("tiny"), text_tokens=0)


def make_sample() -> SampleFlops:
    forward = ForwardGFLOP(vision=10, text_encoder=10, fusion=5, decoder=5, heads=0, momentum=10)
    return SampleFlops("made-up", 257, TextLengths(40, 40, 40), forward, recompute_gflop=20)


def test_model_flops_are_three_forward_with_grad_plus_the_no_grad_forward():
    sample = make_sample()
    assert sample.model_gflop == 3 * 30 + 10
    assert sample.hardware_gflop == 100 + 20


def test_mfu_is_achieved_over_peak_flops():
    # 100 GFLOP per sample at 1,000 samples/s is 1e14 FLOP/s: 10% of a 1e15 peak
    sample = make_sample()
    assert sample.mfu(1_000, 1e15) == pytest.approx(0.10)
    assert sample.hfu(1_000, 1e15) == pytest.approx(0.12)


def test_mfu_refuses_a_zero_peak():
    with pytest.raises(ValueError, match="peak FLOP/s must be > 0"):
        make_sample().mfu(1_000, 0)


@pytest.mark.parametrize(
    ("device", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
        ("NVIDIA L40S", "fp16", 362e12),
        ("NVIDIA L4", "bf16", 121e12),
    ],
)
def test_peak_table_matches_cuda_device_names(device, precision, peak):
    assert peak_flops_for(device, precision) == peak


def test_no_peak_for_a_cpu_or_a_missing_tensor_core_path():
    assert peak_flops_for("cpu", "fp32") is None
    assert peak_flops_for("Tesla V100-SXM2-32GB", "bf16") is None


def test_an_explicit_peak_wins_over_the_table():
    assert resolve_peak_flops("NVIDIA H100 80GB HBM3", "bf16", explicit=800e12) == 800e12
    assert resolve_peak_flops("cpu", "fp32", explicit=2e12) == 2e12
    assert resolve_peak_flops(None, "bf16") is None
