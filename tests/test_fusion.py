"""The skip-connected fusion: which layers run, what each does to the vision states."""

from __future__ import annotations

import torch

from pretrain.config import FusionConfig, load_config
from pretrain.models.attention_mask import padding_mask
from pretrain.models.fusion import ConnectedAttentionLayer, FusionEncoder, fusion_pattern


def tiny_fusion(layers: int, stride: int) -> FusionEncoder:
    torch.manual_seed(0)
    return FusionEncoder(load_config("tiny").model.text, FusionConfig(layers=layers, stride=stride)).eval()


def states(batch=2, text_len=7, vision_len=17, width=64):
    text = torch.randn(batch, text_len, width)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, 5:] = 0
    return text, mask, torch.randn(batch, vision_len, width)


def test_pattern_follows_the_stride_rule():
    assert fusion_pattern(6, 3) == ["co", "co", "co", "connected", "co", "co"]
    assert fusion_pattern(6, 6) == ["co"] * 6
    assert fusion_pattern(4, 1) == ["co", "connected", "connected", "connected"]


def test_only_the_layers_that_run_are_allocated():
    fusion = tiny_fusion(layers=3, stride=2)
    assert len(fusion.layers) == 3
    indices = {int(name.split(".")[1]) for name in fusion.state_dict()}
    assert indices == {0, 1, 2}
    # A connected layer attends over [v ; l] with its self-attention: it owns no cross-attention.
    assert not any(name.startswith("layers.2.crossattention") for name in fusion.state_dict())
    assert any(name.startswith("layers.1.crossattention") for name in fusion.state_dict())


def test_co_attention_layers_leave_the_vision_states_unchanged():
    fusion = tiny_fusion(layers=3, stride=6)
    text, mask, vision = states()
    out = fusion(text, mask, vision)
    assert torch.equal(out.vision, vision)
    assert not torch.allclose(out.text, text)


def test_connected_layer_adds_its_vision_output_as_a_residual():
    fusion = tiny_fusion(layers=2, stride=1)  # co, connected
    text, mask, vision = states()
    co, connected = fusion.layers
    assert isinstance(connected, ConnectedAttentionLayer)
    text_mid, vision_mid = co(text, padding_mask(mask), vision, padding_mask(torch.ones(2, 17)))
    assert torch.equal(vision_mid, vision)

    # What the connected layer's own attention + FFN produce for the vision positions:
    joint = torch.cat([vision, text_mid], dim=1)
    joint_mask = torch.cat([padding_mask(torch.ones(2, 17)), padding_mask(mask)], dim=-1)
    joint = connected.attention(joint, joint_mask)[0]
    joint = connected.output(connected.intermediate(joint), joint)

    out = fusion(text, mask, vision)
    assert not torch.allclose(out.vision, vision)
    torch.testing.assert_close(out.vision, vision + joint[:, :17])
    torch.testing.assert_close(out.text, joint[:, 17:])


def test_joint_output_puts_image_tokens_first():
    fusion = tiny_fusion(layers=1, stride=1)
    text, mask, vision = states()
    out = fusion(text, mask, vision)
    joint = out.joint()
    assert joint.shape == (2, 17 + 7, 64)
    assert torch.equal(joint[:, :17], out.vision)


def test_padded_text_positions_do_not_change_real_outputs():
    fusion = tiny_fusion(layers=3, stride=2)
    text, mask, vision = states()
    altered = text.clone()
    altered[0, 5:] = torch.randn(2, 64) * 10  # padding of sample 0
    a, b = fusion(text, mask, vision), fusion(altered, mask, vision)
    torch.testing.assert_close(a.text[0, :5], b.text[0, :5])
    torch.testing.assert_close(a.vision, b.vision)
