"""The tiny model learns: it overfits a fixed batch of synthetic image-caption pairs on the CPU."""

from __future__ import annotations

import statistics

import torch

from pretrain.objectives.pretraining import MPLUGPretraining

STEPS = 300


def test_tiny_model_overfits_a_fixed_batch_of_eight_pairs(tiny_config, pair_batch):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same trajectory on every machine (reduction order)
    # On a batch seen again and again the queue holds copies of the batch itself, so a queue of one
    # batch and no momentum distillation (whose lagging targets are the point on real data) let
    # every loss approach zero.
    model = MPLUGPretraining(tiny_config("model.queue_size=8", "objectives.distill=false"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    history = []
    for step in range(STEPS):
        out = model(**pair_batch, step=step)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.after_optimizer_step()
        history.append(out.loss.item())
    torch.set_num_threads(threads)
    final = statistics.median(history[-20:])  # MLM and PrefixLM draw new masks and splits every step
    assert final <= 0.2 * history[0], f"total loss {history[0]:.3f} -> {final:.3f}"
