"""Recall at K for image-text retrieval (COCO 5k, Flickr30K 1k), both directions.

The keys and their meaning follow ALBEF/mPLUG's `itm_eval`: `txt_r{k}` is image-to-text
retrieval (an image is a hit if any of its texts is in the top k), `img_r{k}` is text-to-image
(a text is a hit if its one image is in the top k), each in percent, with the mean over K of each
direction and `r_mean` the mean of the two.

Ties: a positive tied with a negative ranks behind it. The official code sorts with argsort,
which puts tied entries in an arbitrary order; counting ties against the positive is the
conservative reading, so a model that gives every candidate the same score gets a rank of
num_candidates - 1 (R@1 = 0) instead of a lucky hit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
MAX_IDS_IN_ERROR = 5


def _as_tensor(sim: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(sim, np.ndarray):
        sim = torch.from_numpy(sim)
    if not isinstance(sim, torch.Tensor):
        raise TypeError(f"sim must be a torch.Tensor or np.ndarray, got {type(sim).__name__}")
    if sim.dim() != 2:
        raise ValueError(
            f"sim must be 2-D (num_images, num_texts) image-to-text scores, got shape "
            f"{tuple(sim.shape)}"
        )
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim has shape {tuple(sim.shape)}: need at least one image and text")
    sim = sim.detach()
    if not sim.is_floating_point():
        sim = sim.double()
    if torch.isnan(sim).any():
        raise ValueError("sim contains NaN scores; ranks would be meaningless")
    return sim


def _as_index(text_to_image: Sequence[int] | torch.Tensor, num_images: int) -> torch.Tensor:
    if isinstance(text_to_image, torch.Tensor):
        index = text_to_image.detach().cpu()
    else:
        index = torch.as_tensor(np.asarray(text_to_image))
    if index.numel() == 0:
        index = index.long()  # np.asarray([]) is float64; an empty list is not a dtype error
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(
            f"text_to_image must be a 1-D sequence of integer image indices, got dtype "
            f"{index.dtype} and shape {tuple(index.shape)}"
        )
    index = index.long()
    bad = ((index < 0) | (index >= num_images)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"text {j} -> {int(index[j])}" for j in bad[:MAX_IDS_IN_ERROR])
        raise ValueError(
            f"text_to_image has {len(bad)} image indices outside [0, {num_images}) for "
            f"{num_images} images: {shown}"
        )
    return index


def _texts_per_image(index: torch.Tensor, num_images: int) -> torch.Tensor:
    """(I,) number of texts of each image; every image must have one."""
    texts_per_image = torch.bincount(index, minlength=num_images)
    lonely = (texts_per_image == 0).nonzero().flatten().tolist()
    if lonely:
        shown = ", ".join(str(i) for i in lonely[:MAX_IDS_IN_ERROR])
        raise ValueError(
            f"{len(lonely)} of {num_images} images have no text in text_to_image (e.g. image "
            f"{shown}); every image needs at least one caption for image-to-text recall"
        )
    return texts_per_image


def _validate(
    sim: torch.Tensor | np.ndarray, text_to_image: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    sim = _as_tensor(sim)
    num_images, num_texts = sim.shape
    index = _as_index(text_to_image, num_images)
    if index.numel() != num_texts:
        raise ValueError(
            f"text_to_image has {index.numel()} entries but sim has {num_texts} text columns "
            f"(shape {tuple(sim.shape)}); give the image index of every text"
        )
    _texts_per_image(index, num_images)
    return sim, index.to(sim.device)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return ks


def retrieval_recall(
    sim: torch.Tensor | np.ndarray,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall at each K, in percent, from image-to-text scores.

    sim: (num_images, num_texts), higher = more similar; text j belongs to image text_to_image[j].
    Returns txt_r{k} (image -> text), img_r{k} (text -> image) for each k, txt_r_mean and
    img_r_mean (means over ks) and r_mean (their mean).
    """
    ks = _check_ks(ks)
    sim, index = _validate(sim, text_to_image)
    num_images, num_texts = sim.shape
    image_rows = torch.arange(num_images, device=sim.device)

    # Image -> text. The rank of an image is the rank of its best text: the number of
    # negatives scoring at least as high as that text (>=: ties go against the positive).
    positive = index.unsqueeze(0) == image_rows.unsqueeze(1)  # (I, T)
    best_positive = sim.masked_fill(~positive, -torch.inf).amax(dim=1)  # (I,)
    txt_ranks = ((sim >= best_positive.unsqueeze(1)) & ~positive).sum(dim=1)  # (I,)

    # Text -> image: the number of other images scoring at least as high as the text's image.
    text_cols = torch.arange(num_texts, device=sim.device)
    own_score = sim[index, text_cols]  # (T,)
    img_ranks = (sim >= own_score.unsqueeze(0)).sum(dim=0) - 1  # (T,) minus the image itself

    result: dict[str, float] = {}
    for name, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in ks:
            result[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        result[f"{name}_r_mean"] = sum(result[f"{name}_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def random_recall_at_1(
    num_images: int, text_to_image: Sequence[int] | torch.Tensor
) -> dict[str, float]:
    """Expected R@1 (percent) of a ranking drawn at random: the chance baseline for a report.

    Image -> text: an image with p of the T texts hits with probability p / T, averaged over
    images. Text -> image: 1 / num_images. Since every image has at least one text, the first is
    sum(p) / (num_images * T) = 1 / num_images as well; both keys are kept so a baseline row has
    the same columns as a model's. Returns txt_r1, img_r1 and r_mean (their mean).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    index = _as_index(text_to_image, num_images)
    texts_per_image = _texts_per_image(index, num_images).double()  # (I,)
    txt_r1 = 100.0 * (texts_per_image / index.numel()).mean().item()
    img_r1 = 100.0 / num_images
    return {"txt_r1": txt_r1, "img_r1": img_r1, "r_mean": (txt_r1 + img_r1) / 2}
