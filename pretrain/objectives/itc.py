"""Image-text contrastive loss (ITC) with a momentum feature queue and momentum distillation.

Logits compare each image with every text of the batch and of the queue (and the reverse), at a
learnable temperature. Targets mix the ground truth with the momentum model's softmax:
alpha * softmax(momentum sims) + (1 - alpha) * ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.distributed import gather

NO_ID = -1  # queue slots not yet filled, or samples without an image id
EMPTY_LOGIT = -1e4  # logit of an unfilled queue slot: exp() underflows to 0, no NaN from 0 * -inf


@dataclass
class ITCInputs:
    image_feat: torch.Tensor  # (B, E) normalised, online model
    text_feat: torch.Tensor  # (B, E)
    image_feat_m: torch.Tensor  # (B, E) normalised, momentum model
    text_feat_m: torch.Tensor  # (B, E)
    temp: torch.Tensor  # scalar, already clamped
    alpha: float  # weight of the momentum targets; 0 turns distillation off
    image_ids: torch.Tensor | None = None  # (B,) same id = same image = positive pair


@dataclass
class ITCOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, B + Q) logits of the online model
    sim_t2i: torch.Tensor  # (B, B + Q)


class FeatureQueue(nn.Module):
    """The last `size` momentum features of both modalities, with the image id of each.

    Slots that were never filled take no part in the loss, so a fresh queue compares against the
    batch alone rather than against random vectors.
    """

    def __init__(self, embed_dim: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("image", F.normalize(torch.randn(embed_dim, size), dim=0))  # (E, Q)
        self.register_buffer("text", F.normalize(torch.randn(embed_dim, size), dim=0))  # (E, Q)
        self.register_buffer("ids", torch.full((size,), NO_ID, dtype=torch.long))  # (Q,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, ids: torch.Tensor) -> None:
        """Add this step's momentum features from every rank, so each rank holds the same queue."""
        image_all, text_all, ids_all = gather(image_feat_m), gather(text_feat_m), gather(ids)
        batch = image_all.shape[0]
        if self.size % batch != 0:
            raise ValueError(
                f"ITC queue size {self.size} is not divisible by the global batch {batch}; "
                f"set model.queue_size to a multiple of {batch}"
            )
        start = int(self.ptr)
        self.image[:, start : start + batch] = image_all.T.to(self.image.dtype)
        self.text[:, start : start + batch] = text_all.T.to(self.text.dtype)
        self.ids[start : start + batch] = ids_all
        self.ptr.fill_((start + batch) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + batch))

    def valid_columns(self, batch: int) -> torch.Tensor:
        """(B + Q,) True for the batch columns and the filled queue slots."""
        slots = torch.arange(self.size, device=self.ptr.device) < self.filled
        return torch.cat([torch.ones(batch, dtype=torch.bool, device=slots.device), slots])


def positive_targets(batch_ids: torch.Tensor, queue_ids: torch.Tensor) -> torch.Tensor:
    """(B, B + Q) targets: 1/k for each of the k entries sharing the row's image id, else 0."""
    all_ids = torch.cat([batch_ids, queue_ids])  # (B + Q,)
    positive = (batch_ids[:, None] == all_ids[None, :]) & (batch_ids[:, None] != NO_ID)
    eye = torch.eye(len(batch_ids), all_ids.numel(), dtype=torch.bool, device=batch_ids.device)
    positive |= eye  # a sample is always its own positive, with or without ids
    positive = positive.float()
    return positive / positive.sum(dim=1, keepdim=True)


def itc_loss(inputs: ITCInputs, queue: FeatureQueue) -> ITCOutput:
    """The symmetric ITC loss against the batch and the queue; the caller enqueues afterwards."""
    batch = inputs.image_feat.shape[0]
    ids = inputs.image_ids if inputs.image_ids is not None else torch.full(
        (batch,), NO_ID, dtype=torch.long, device=inputs.image_feat.device
    )
    with torch.no_grad():
        image_all = torch.cat([inputs.image_feat_m.T, queue.image.clone().detach()], dim=1)  # (E, B + Q)
        text_all = torch.cat([inputs.text_feat_m.T, queue.text.clone().detach()], dim=1)  # (E, B + Q)
        targets = positive_targets(ids, queue.ids)  # (B, B + Q)
        empty = ~queue.valid_columns(batch)  # (B + Q,) unfilled queue slots
        targets = targets.masked_fill(empty, 0.0)
        if inputs.alpha > 0:
            sim_i2t_m = (inputs.image_feat_m @ text_all / inputs.temp).float().masked_fill(empty, EMPTY_LOGIT)
            sim_t2i_m = (inputs.text_feat_m @ image_all / inputs.temp).float().masked_fill(empty, EMPTY_LOGIT)
            i2t_targets = inputs.alpha * sim_i2t_m.softmax(dim=1) + (1 - inputs.alpha) * targets
            t2i_targets = inputs.alpha * sim_t2i_m.softmax(dim=1) + (1 - inputs.alpha) * targets
        else:
            i2t_targets = t2i_targets = targets
    sim_i2t = (inputs.image_feat @ text_all.to(inputs.image_feat.dtype) / inputs.temp).float()  # (B, B + Q)
    sim_t2i = (inputs.text_feat @ image_all.to(inputs.text_feat.dtype) / inputs.temp).float()  # (B, B + Q)
    sim_i2t, sim_t2i = sim_i2t.masked_fill(empty, EMPTY_LOGIT), sim_t2i.masked_fill(empty, EMPTY_LOGIT)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(dim=1).mean()
    return ITCOutput(loss=(loss_i2t + loss_t2i) / 2, sim_i2t=sim_i2t, sim_t2i=sim_t2i)
