"""The four pretraining objectives: their statistics, sampling rules and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.objectives.batch_draws import BatchDraws
from pretrain.objectives.itc import FeatureQueue, ITCInputs, itc_loss
from pretrain.objectives.itm import positive_mask, sample_hard_negatives
from pretrain.objectives.mlm import IGNORE, mask_tokens
from pretrain.objectives.prefix_lm import split_prefix
from pretrain.objectives.pretraining import MPLUGPretraining

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def test_itc_loss_of_an_untrained_model_is_log_of_batch_plus_queue(tiny_config, pair_batch):
    torch.manual_seed(0)
    config = tiny_config("objectives.itm=false", "objectives.mlm=false", "objectives.prefix_lm=false")
    model = MPLUGPretraining(config).eval()
    batch, queue = 8, config.model.queue_size
    with torch.no_grad():
        first = model(pair_batch["images"], pair_batch["input_ids"], pair_batch["attention_mask"])
        for _ in range(queue // batch):  # fill the queue with the untrained model's own features
            out = model(pair_batch["images"], pair_batch["input_ids"], pair_batch["attention_mask"])
    # An empty queue takes no part: the first step is a batch-way softmax.
    assert first.losses["itc"].item() == pytest.approx(math.log(batch), rel=0.02)
    assert out.losses["itc"].item() == pytest.approx(math.log(batch + queue), rel=0.02)


def test_itc_targets_spread_over_every_entry_of_the_same_image():
    queue = FeatureQueue(embed_dim=4, size=4)
    feats = torch.eye(4)[:2]  # two orthogonal samples, image ids 7 and 9
    ids = torch.tensor([7, 9])
    queue.enqueue(feats, feats, ids)
    queue.enqueue(feats, feats, ids)
    # Each sample matches itself and its two queued copies equally well and nothing else: with the
    # targets spread evenly over those three positives the loss is log(3).
    out = itc_loss(ITCInputs(feats, feats, feats, feats, torch.tensor(1e-3), 0.0, ids), queue)
    assert out.sim_i2t.shape == (2, 6)
    assert out.loss.item() == pytest.approx(math.log(3), abs=1e-4)
    # Without ids the queued copies are negatives that score as high as the positive.
    out = itc_loss(ITCInputs(feats, feats, feats, feats, torch.tensor(1e-3), 0.0, None), queue)
    assert out.loss.item() == pytest.approx(math.log(3), abs=1e-4)


def test_mlm_masks_15_percent_with_80_10_10_and_never_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (1000, 100), generator=generator)  # 100k tokens
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[:, 80:-1] = PAD
    special = torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    out = mask_tokens(ids, vocab_size=1000, mask_id=MASK, special_ids=(PAD, CLS, SEP, MASK), draws=BatchDraws(generator))
    chosen = out.labels != IGNORE
    assert not (chosen & special).any()
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = chosen & (out.input_ids == MASK)
    kept = chosen & (out.input_ids == ids)
    randomised = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.80, abs=0.01)
    # A random draw can hit the original token (1 in 1000): kept absorbs those.
    assert kept.sum().item() / n == pytest.approx(0.10, abs=0.01)
    assert randomised.sum().item() / n == pytest.approx(0.10, abs=0.01)
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])


def test_hard_negative_is_never_a_positive():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # repeated images: all their pairs are positives
    positive = positive_mask(8, 8, ids, torch.device("cpu"))
    assert positive.diagonal().all()
    sim = torch.randn(8, 8) * 5
    sim[positive] = 50.0  # positives are by far the most similar: they must still never be drawn
    for _ in range(200):
        drawn = sample_hard_negatives(sim, positive)
        assert not positive[torch.arange(8), drawn].any()


def test_hard_negative_follows_the_similarity():
    torch.manual_seed(0)
    positive = torch.eye(3, dtype=torch.bool)
    sim = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    drawn = torch.stack([sample_hard_negatives(sim, positive) for _ in range(500)])
    assert (drawn == torch.tensor([1, 2, 0])).float().mean() > 0.95


def test_a_batch_of_one_has_no_negative_and_says_so():
    with pytest.raises(ValueError, match="at least one negative"):
        sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_prefix_split_keeps_cls_and_k_pieces_and_decodes_the_rest():
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, 15, SEP, PAD, PAD]])
    mask = (ids != PAD).long()
    for seed in range(20):
        split = split_prefix(ids, mask, cls_id=CLS, pad_id=PAD, draws=BatchDraws(torch.Generator().manual_seed(seed)))
        k = split.split.item()
        assert 1 <= k <= 3  # six pieces: k in [1, 6 // 2]
        assert split.prefix_mask[0].tolist() == [1] * (k + 1) + [0] * (9 - k)
        rest = ids[0, k + 1 : 8].tolist()  # remaining pieces and [SEP]
        assert split.decoder_ids[0, : len(rest) + 1].tolist() == [CLS, *rest]
        assert split.decoder_mask[0].sum().item() == len(rest) + 1
        assert split.labels[0, : len(rest)].tolist() == rest
        assert (split.labels[0, len(rest) :] == IGNORE).all()


def test_every_trainable_parameter_gets_a_gradient(tiny_config, pair_batch):
    torch.manual_seed(0)
    model = MPLUGPretraining(tiny_config())
    out = model(**pair_batch, step=5)
    assert set(out.losses) == {"itc", "itm", "mlm", "prefix_lm"}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert not any(p.requires_grad for p in model.model.momentum.parameters())


def test_each_objective_can_be_switched_off(tiny_config, pair_batch):
    model = MPLUGPretraining(tiny_config("objectives.itc=false", "objectives.itm=false"))
    out = model(**pair_batch)
    assert set(out.losses) == {"mlm", "prefix_lm"}


def test_ema_moves_every_momentum_copy_toward_its_online_module(tiny_config, pair_batch):
    torch.manual_seed(0)
    model = MPLUGPretraining(tiny_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {n: p.clone() for n, p in model.model.momentum.named_parameters()}
    model(**pair_batch).loss.backward()
    optimizer.step()
    model.after_optimizer_step()
    decay = model.config.model.momentum
    online = dict(model.model.named_parameters())
    for name, copy in model.model.momentum.named_parameters():
        source = online[name]  # the copies keep the online names: vision.*, fusion.*, ...
        torch.testing.assert_close(copy, decay * before[name] + (1 - decay) * source)
    moved = {n.split(".")[0] for n, p in model.model.momentum.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"vision", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head"}


def test_alpha_ramps_linearly_over_its_warmup(tiny_config):
    model = MPLUGPretraining(tiny_config("objectives.alpha=0.4", "objectives.alpha_warmup_steps=100"))
    assert [model.alpha(s) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_forward_runs_under_bf16_autocast(tiny_config, pair_batch):
    model = MPLUGPretraining(tiny_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**pair_batch)
    assert torch.isfinite(out.loss)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config, pair_batch):
    losses, grads = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = MPLUGPretraining(tiny_config("objectives.itm=false", f"model.grad_checkpointing={str(recompute).lower()}"))
        torch.manual_seed(1)
        out = model(**pair_batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.model.fusion.layers[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
