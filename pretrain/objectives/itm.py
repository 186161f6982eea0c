"""Image-text matching (ITM) with hard negatives.

Each text gets one negative image and each image one negative text, drawn with probability
softmax(in-batch ITC similarity) over the whole (gathered) batch with the positives excluded. The
fusion module then sees B positive and 2B negative pairs, and the 2-way head on the fused text
[CLS] classifies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.objectives.distributed import gather, gather_with_grad, rank


@dataclass
class ITMInputs:
    vision: torch.Tensor  # (B, Lv, D) local vision states
    text: torch.Tensor  # (B, Lt, D) local text-encoder states
    text_mask: torch.Tensor  # (B, Lt)
    image_feat: torch.Tensor  # (B, E) normalised ITC features, for the sampling weights
    text_feat: torch.Tensor  # (B, E)
    temp: torch.Tensor
    image_ids: torch.Tensor | None = None  # (B,) pairs sharing an id are positives


@dataclass
class ITMOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # (3B, 2): positives, then image negatives, then text negatives
    labels: torch.Tensor  # (3B,) 1 = match
    negative_images: torch.Tensor  # (B,) global index of each text's negative image
    negative_texts: torch.Tensor  # (B,) global index of each image's negative text


def positive_mask(local: int, total: int, ids_all: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B, N) True where global sample j is a positive of local sample i: itself, or the same image id."""
    offset = rank() * local
    mask = torch.zeros(local, total, dtype=torch.bool, device=device)
    mask[torch.arange(local, device=device), torch.arange(local, device=device) + offset] = True
    if ids_all is not None:
        local_ids = ids_all[offset : offset + local]
        mask |= local_ids[:, None] == ids_all[None, :]
    return mask


def sample_hard_negatives(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability softmax(sim) over the non-positive columns."""
    if bool(positive.all(dim=1).any()):
        raise ValueError(
            "ITM needs at least one negative per sample, but some sample has only positives in the "
            "batch (batch of one, or every pair shares one image id); use a larger global batch"
        )
    weights = F.softmax(sim.float(), dim=1).masked_fill(positive, 0.0)
    # A row whose negatives all underflowed to 0 falls back to uniform over its negatives.
    empty = weights.sum(dim=1, keepdim=True) <= 0
    weights = torch.where(empty, (~positive).float(), weights)
    return torch.multinomial(weights, 1).squeeze(1)


def itm_loss(inputs: ITMInputs, fuse, itm_head) -> ITMOutput:
    """`fuse(text, text_mask, vision)` returns fused states; `itm_head` maps the fused [CLS] to 2 logits."""
    batch = inputs.vision.shape[0]
    vision_all = gather_with_grad(inputs.vision)  # (N, Lv, D)
    text_all = gather_with_grad(inputs.text)  # (N, Lt, D)
    mask_all = gather(inputs.text_mask)  # (N, Lt)
    ids_all = gather(inputs.image_ids) if inputs.image_ids is not None else None
    with torch.no_grad():
        image_feat_all, text_feat_all = gather(inputs.image_feat), gather(inputs.text_feat)
        positive = positive_mask(batch, vision_all.shape[0], ids_all, inputs.vision.device)  # (B, N)
        sim_t2i = inputs.text_feat @ image_feat_all.T / inputs.temp  # (B, N)
        sim_i2t = inputs.image_feat @ text_feat_all.T / inputs.temp  # (B, N)
        negative_images = sample_hard_negatives(sim_t2i, positive)
        negative_texts = sample_hard_negatives(sim_i2t, positive)

    vision = torch.cat([inputs.vision, vision_all[negative_images], inputs.vision])  # (3B, Lv, D)
    text = torch.cat([inputs.text, inputs.text, text_all[negative_texts]])  # (3B, Lt, D)
    mask = torch.cat([inputs.text_mask, inputs.text_mask, mask_all[negative_texts]])  # (3B, Lt)
    fused = fuse(text, mask, vision)
    logits = itm_head(fused.text[:, 0])  # (3B, 2)
    labels = torch.cat(
        [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
    ).to(logits.device)
    return ITMOutput(
        loss=F.cross_entropy(logits.float(), labels),
        logits=logits,
        labels=labels,
        negative_images=negative_images,
        negative_texts=negative_texts,
    )
