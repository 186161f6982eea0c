"""mPLUG-2's model: local temporal modules in the ViT, universal layers shared with the text
encoder, and the image path of mPLUG left as it was."""

from __future__ import annotations

import pytest
import torch
from test_weights import write_bert
from torch import nn

from pretrain.config import load_config
from pretrain.models.mplug import MPLUG, encode_visual
from pretrain.models.summary import summarize
from pretrain.models.temporal import LocalTemporal
from pretrain.models.vision import VisionEncoder
from pretrain.models.weights import load_bert_weights

FRAMES, SIZE, PATCHES = 3, 64, 64  # 64 px at patch 8: an 8 x 8 grid

# `mplug model summary` of the two released sizes, per module. The paper gives ~0.9B for large
# and no breakdown; the README's "Model sizes" section explains the difference module by module.
PRESET_PARAMS = {
    "mplug2_base": {
        "vision": 85_799_424, "temporal": 14_257_152, "text_encoder": 108_891_648, "universal": 7_130_112,
        "fusion": 28_355_328, "decoder": 137_881_146, "heads": 1_017_917,
    },
    "mplug2_large": {
        "vision": 303_179_776, "temporal": 50_601_984, "text_encoder": 334_092_288, "universal": 12_652_544,
        "fusion": 100_780_032, "decoder": 234_425_146, "heads": 1_609_021,
    },
}
PRESET_TOTALS = {"mplug2_base": 383_332_727, "mplug2_large": 1_037_340_791}


def tiny_mplug2(*overrides: str) -> MPLUG:
    torch.manual_seed(0)
    return MPLUG(load_config("mplug2_tiny", overrides).model).eval()


def tiny_vision(temporal: bool = True) -> VisionEncoder:
    torch.manual_seed(0)
    model = load_config("mplug2_tiny", [f"model.video.temporal={str(temporal).lower()}"]).model
    return VisionEncoder(model.vision, model.text.width, video=model.video).eval()


def video(batch: int = 2, frames: int = FRAMES) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, frames, 3, SIZE, SIZE)


def wake_temporal_modules(encoder: VisionEncoder) -> None:
    """Give every temporal module a non-zero up-projection, as training would."""
    torch.manual_seed(2)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, LocalTemporal):
                module.up.weight.normal_(std=0.5)


def frame_patches(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, 1 + T*N, D) -> the patches as (B, T, N, D)."""
    return tokens[:, 1:].reshape(tokens.shape[0], frames, -1, tokens.shape[-1])


# --- temporal modules ---------------------------------------------------------------------------


def test_one_frame_video_equals_the_image_with_new_temporal_modules_and_universal_layers():
    model = tiny_mplug2()
    images = video(frames=1)[:, 0]
    assert model.universal is not None and model.vision.temporal is not None

    as_image = model.encode_image(images)  # (2, 1 + 64, 64)
    as_video = model.encode_image(images[:, None])  # (2, 1 + 1 * 64, 64)

    assert as_video.shape == as_image.shape == (2, 1 + PATCHES, 64)
    torch.testing.assert_close(as_video, as_image, atol=1e-6, rtol=0)


def test_new_temporal_modules_leave_frame_order_out_of_every_frames_tokens():
    encoder = tiny_vision()
    clip = video()
    forward, backward = encoder(clip), encoder(clip.flip(1))
    torch.testing.assert_close(frame_patches(backward, FRAMES).flip(1), frame_patches(forward, FRAMES),
                               atol=1e-5, rtol=0)


def test_trained_temporal_modules_make_each_frame_depend_on_its_neighbours_order():
    encoder = tiny_vision()
    wake_temporal_modules(encoder)
    clip = video()

    forward, backward = encoder(clip), encoder(clip.flip(1))

    assert forward.shape == (2, 1 + FRAMES * PATCHES, 64)
    # The middle frame has the same neighbours either way round, but in the other order.
    gap = (frame_patches(backward, FRAMES).flip(1) - frame_patches(forward, FRAMES)).abs().amax()
    assert gap > 1e-2


def test_a_new_temporal_module_is_zero_yet_its_up_projection_learns():
    encoder = tiny_vision()
    encoder.train()
    up = encoder.temporal[0].before.up
    assert torch.count_nonzero(up.weight) == 0 and torch.count_nonzero(up.bias) == 0

    encoder(video()).square().mean().backward()

    assert up.weight.grad.abs().sum() > 0
    assert up.bias.grad.abs().sum() > 0


def test_temporal_module_leaves_the_cls_token_untouched():
    torch.manual_seed(0)
    module = LocalTemporal(16, kernel=3, ratio=0.5)
    nn.init.normal_(module.up.weight)
    tokens = torch.randn(2 * FRAMES, 1 + 5, 16)  # (B*T, 1 + N, D)

    out = module(tokens, FRAMES)

    assert torch.equal(out[:, 0], tokens[:, 0])
    assert not torch.allclose(out[:, 1:], tokens[:, 1:])


def test_video_tokens_are_the_frames_mean_cls_then_every_frames_patches_frame_major():
    encoder = tiny_vision()
    norm, encoder.vit.norm = encoder.vit.norm, nn.Identity()  # compare the tokens before the final norm
    clip = video()
    frames = [encoder(clip[:, t]) for t in range(FRAMES)]  # each (2, 1 + N, D), without temporal effect

    tokens = encoder(clip)

    torch.testing.assert_close(tokens[:, 0], torch.stack([f[:, 0] for f in frames], 1).mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens[:, 1:], torch.cat([f[:, 1:] for f in frames], 1), atol=1e-5, rtol=0)
    encoder.vit.norm = norm
    torch.testing.assert_close(encoder(clip)[:, 0], norm(tokens[:, 0]), atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_the_same_video_gradients():
    grads = []
    for recompute in (False, True):
        encoder = tiny_vision()
        wake_temporal_modules(encoder)
        encoder.train()
        encoder.set_grad_checkpointing(recompute)
        encoder(video()).square().mean().backward()
        grads.append([p.grad for p in encoder.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_vision_input_of_another_rank_is_refused():
    with pytest.raises(ValueError, match=r"images \(B, 3, H, W\) or videos \(B, T, 3, H, W\), got shape \(3, 64, 64\)"):
        tiny_vision()(torch.randn(3, SIZE, SIZE))


# --- universal layers ---------------------------------------------------------------------------


def test_universal_layers_keep_the_visual_length_of_images_and_videos():
    model = tiny_mplug2()
    clip = video()
    assert model.encode_image(clip[:, 0]).shape == (2, 1 + PATCHES, 64)
    assert model.encode_image(clip).shape == (2, 1 + FRAMES * PATCHES, 64)


def test_universal_layers_run_the_text_encoders_last_layer_under_one_name():
    model = tiny_mplug2()
    shared = model.text_encoder.layers[-1].attention.self.query.weight
    online = {k: v for k, v in model.state_dict().items() if not k.startswith("momentum.")}

    assert [k for k, v in online.items() if v.data_ptr() == shared.data_ptr()] == [
        "text_encoder.layers.1.attention.self.query.weight"
    ]
    assert {k.split(".")[1] for k in online if k.startswith("universal.")} == {"latents", "cross", "back"}

    before = model.encode_image(video()[:, 0])
    with torch.no_grad():
        shared.mul_(2.0)
    assert not torch.allclose(model.encode_image(video()[:, 0]), before)


def test_universal_layers_beyond_the_text_encoder_are_refused():
    with pytest.raises(ValueError, match=r"universal.layers=3 must lie between 0 and text.encoder_layers=2"):
        tiny_mplug2("model.universal.layers=3")


def test_momentum_copies_hold_the_universal_module_and_follow_it():
    model = tiny_mplug2()
    assert list(model.momentum) == [
        "vision", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head", "universal"
    ]
    clip = video()
    torch.testing.assert_close(encode_visual(model.momentum, clip), model.encode_image(clip))

    start = model.momentum.universal.latents.clone()
    with torch.no_grad():
        model.universal.latents.add_(1.0)
    model.after_optimizer_step()

    decay = model.cfg.momentum
    expected = decay * start + (1 - decay) * model.universal.latents
    torch.testing.assert_close(model.momentum.universal.latents, expected)


# --- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_presets_build_on_the_meta_device_with_their_counts(name):
    summary = summarize(load_config(name))
    assert summary.params_by_module == PRESET_PARAMS[name]
    assert summary.total_params == PRESET_TOTALS[name]
    assert summary.fusion_pattern == ["co"] * load_config(name).model.fusion.layers


def test_large_lies_within_a_sixth_of_the_papers_0_9_billion():
    total = PRESET_TOTALS["mplug2_large"]
    assert 0.9e9 < total < 0.9e9 * 7 / 6


def test_summary_counts_temporal_apart_from_the_vit_and_shared_layers_once():
    summary = summarize(load_config("mplug2_tiny"))
    model = tiny_mplug2()

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    by = summary.params_by_module
    assert by["temporal"] == count(model.vision.temporal)
    assert by["vision"] == count(model.vision) - count(model.vision.temporal)
    assert by["universal"] == count(model.universal)
    assert by["text_encoder"] == count(model.text_encoder)
    assert summary.total_params == count(model) - count(model.momentum) == sum(by.values())


# --- mPLUG unchanged ----------------------------------------------------------------------------


def test_mplug_has_no_temporal_or_universal_modules_and_encodes_frames_alone():
    torch.manual_seed(0)
    model = MPLUG(load_config("tiny").model).eval()
    assert model.vision.temporal is None and model.universal is None
    assert not any("temporal" in k or "universal" in k for k in model.state_dict())
    assert list(model.momentum) == ["vision", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head"]

    clip = video()
    torch.testing.assert_close(model.encode_image(clip[:, 1]), model.vision(clip[:, 1]), atol=0, rtol=0)
    frames = frame_patches(model.encode_image(clip), FRAMES)
    torch.testing.assert_close(frames[:, 1], model.encode_image(clip[:, 1])[:, 1:], atol=1e-5, rtol=0)


# --- BERT initialisation ------------------------------------------------------------------------


def test_mplug2_fusion_starts_from_the_berts_last_layers(tmp_path):
    bert = write_bert(load_config("mplug2_tiny").model, tmp_path, layers=3)  # text encoder: layers 0, 1; fusion (2 layers): layers 1, 2
    model = tiny_mplug2()

    report = load_bert_weights(model, tmp_path)

    for j, source in enumerate((1, 2)):
        torch.testing.assert_close(model.fusion.layers[j].attention.state_dict(),
                                   bert.bert.encoder.layer[source].attention.state_dict())
    torch.testing.assert_close(model.text_encoder.layers[1].state_dict(), bert.bert.encoder.layer[1].state_dict())
    assert {"universal.latents", "universal.back.self.query.weight"} <= set(report.new)


def test_mplug2_bert_shallower_than_its_text_encoder_is_refused(tmp_path):
    write_bert(load_config("mplug2_tiny").model, tmp_path, layers=1)
    with pytest.raises(ValueError, match=r"text.encoder_layers=2: that many layers start from BERT layers"):
        load_bert_weights(tiny_mplug2(), tmp_path)
