"""Image-text retrieval (COCO 5k, Flickr30K 1k): fine-tuned with ITC + ITM, ranked by ITC then ITM.

Training is the pretraining pair of objectives on one caption per sample: ITC against the batch and
a momentum feature queue (owned here) with momentum distillation, then ITM on hard negatives drawn
from the ITC similarities. Both use the batch's `image_ids`, so two captions of one image are
positives of each other, never negatives.

Evaluation (ALBEF's and mPLUG's `evaluation`), on a split with one sample per image and all of its
captions in `meta["captions"]`:

    1. ITC similarity of every image with every caption             sim (I, T)
    2. image -> text: each image's top `k_test` captions re-scored   score_i2t (I, T)
       text -> image: each caption's top `k_test` images re-scored   score_t2i (I, T)
       by the ITM match logit itm_head(fused [CLS])[:, 1]; every pair outside the top k scores
       OUTSIDE_TOP_K, behind every re-scored one
    3. txt_r{1,5,10} from score_i2t, img_r{1,5,10} from score_t2i

Several ranks. Each rank encodes the images its loader shard holds and keeps their vision states
(the large part: I x Lv x D) where they are. The image ITC features and the caption strings of
every rank are gathered on rank 0 and broadcast back, so every rank holds all of them in one order
(rank 0's images first, then rank 1's, ...). Each rank then tokenises and encodes every caption
itself (cheap next to the vision tower; identical on every rank, so every rank computes the same
sim and the same top k) and re-scores the pairs whose image it holds: the top-k rows of its own
images and, of every caption's top-k images, the ones it holds. Rank 0 gathers those scores,
assembles both matrices and computes the metrics; every rank returns them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from data_prep.batch import tokenize
from finetune.metrics.retrieval_recall import DEFAULT_KS, random_recall_at_1, retrieval_recall
from finetune.tasks.base import EvalContext, TaskModel, TaskOutput
from pretrain.models.mplug import MPLUG, encode_visual, image_feature, text_feature
from pretrain.objectives.itc import NO_ID, FeatureQueue, ITCInputs, itc_loss
from pretrain.objectives.itm import ITMInputs, itm_loss

RESULTS_FILE = "retrieval_scores.json"
# The score of a pair the ITM head did not re-score. retrieval_recall counts ties against the
# positive, so a positive outside the top k ranks behind every candidate, as in ALBEF (-100).
OUTSIDE_TOP_K = float("-inf")
MATCH = 1  # the ITM head's "match" logit


@dataclass
class RetrievalSettings:
    alpha: float = 0.4  # weight of the momentum ITC targets (ALBEF / mPLUG retrieval recipe)
    # Steps over which alpha ramps up linearly from 0; the recipe ramps over the first epoch
    # (set it to that many steps); 0 uses alpha from the first step.
    alpha_warmup_steps: int = 0
    k_test: int = 256  # candidates per query re-scored by ITM (clipped to the number of candidates)
    max_text_length: int = 30  # tokens of an evaluation caption, [CLS] and [SEP] included
    eval_batch_size: int = 256  # captions per text-encoder pass and pairs per ITM pass (the recipe's k_test pairs)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"task.alpha must be in [0, 1] (the weight of the momentum targets), got {self.alpha}")
        for name in ("k_test", "max_text_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be a positive integer, got {getattr(self, name)}")
        if self.alpha_warmup_steps < 0:
            raise ValueError(f"task.alpha_warmup_steps must be >= 0 (0: no ramp), got {self.alpha_warmup_steps}")


@dataclass
class RankedPairs:
    """Pairs re-scored by ITM, as global indices into the image and caption order."""

    images: torch.Tensor  # (P,) long
    texts: torch.Tensor  # (P,) long
    scores: torch.Tensor  # (P,) float ITM match logits

    def cpu(self) -> RankedPairs:
        return RankedPairs(self.images.cpu(), self.texts.cpu(), self.scores.float().cpu())


class RetrievalTask(TaskModel):
    name = "retrieval"
    metric = "r1_mean"  # mean of txt_r1 and img_r1; `baseline` is the same mean for a random ranking
    uses_momentum = True  # the momentum copies give the ITC soft targets and the queue's features
    Settings = RetrievalSettings

    def __init__(self, model: MPLUG, settings: RetrievalSettings, tokenizer):
        super().__init__(model, settings, tokenizer)
        if settings.alpha > 0 and model.momentum is None:
            raise ValueError(
                f"retrieval distils from the momentum copies (task.alpha={settings.alpha}) but the model "
                "has none; build MPLUG with momentum=True or set task.alpha=0"
            )
        self.queue = FeatureQueue(model.cfg.embed_dim, model.cfg.queue_size)

    def loader_fields(self, train: bool) -> dict[str, Any]:
        # Train: one sample per caption; eval: one per image, its captions read from meta["captions"].
        return {"augment": "finetune" if train else "eval", "text_field": "txt"}

    def alpha(self, step: int) -> float:
        """The distillation weight at `step`, ramped linearly from 0 over `alpha_warmup_steps`."""
        warmup = self.settings.alpha_warmup_steps
        return self.settings.alpha * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        """ITC + ITM of one micro-batch; `input_ids` must be padded to one length on every rank."""
        model = self.model
        images, input_ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        image_ids = batch.get("image_ids")
        alpha = self.alpha(step)
        vision = model.encode_image(images)  # (B, Lv, D)
        text = model.encode_text(input_ids, mask)  # (B, Lt, D)
        image_feat, text_feat = image_feature(model, vision), text_feature(model, text)  # (B, E) each
        temp = model.temperature()
        with torch.no_grad():
            if model.momentum is not None:
                momentum = model.momentum
                image_feat_m = image_feature(momentum, encode_visual(momentum, images))
                text_feat_m = text_feature(momentum, momentum.text_encoder(input_ids, mask))
            else:  # alpha == 0 without copies: the online features fill the batch columns and the queue
                image_feat_m, text_feat_m = image_feat.detach(), text_feat.detach()
        itc = itc_loss(ITCInputs(image_feat, text_feat, image_feat_m, text_feat_m, temp, alpha, image_ids), self.queue)
        ids = image_ids if image_ids is not None else torch.full_like(input_ids[:, 0], NO_ID)
        self.queue.enqueue(image_feat_m, text_feat_m, ids)
        itm = itm_loss(
            ITMInputs(vision, text, mask, image_feat.detach(), text_feat.detach(), temp.detach(), image_ids),
            model.fuse,
            model.itm_head,
        )
        return TaskOutput(loss=itc.loss + itm.loss, losses={"itc": itc.loss, "itm": itm.loss})

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        was_training = self.training
        self.eval()
        try:
            return self._evaluate(batches, context)
        finally:
            self.train(was_training)

    def _evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        model, settings = self.model, self.settings
        device = model.temp.device

        # 1. This rank's images: ITC features to share, vision states kept here for ITM.
        vision_parts, feat_parts, captions, keys = [], [], [], []
        for batch in batches:
            vision = model.encode_image(batch["images"])  # (b, Lv, D)
            vision_parts.append(vision)
            feat_parts.append(image_feature(model, vision).float().cpu())  # (b, E)
            captions += [list(meta["captions"]) for meta in batch["meta"]]
            keys += list(batch["keys"])
        local_feat = torch.cat(feat_parts) if feat_parts else torch.empty(0, model.cfg.embed_dim)
        vision_local = torch.cat(vision_parts) if vision_parts else None  # (n, Lv, D)
        record = {"image_feat": local_feat, "captions": captions, "keys": keys}
        parts = context.broadcast(context.gather([record]))  # one record per rank, in rank order
        offset = sum(len(part["keys"]) for part in parts[: context.rank])
        image_feat = torch.cat([part["image_feat"] for part in parts]).to(device)  # (I, E)
        all_captions = [caps for part in parts for caps in part["captions"]]
        _check_captions(all_captions, [key for part in parts for key in part["keys"]])
        text_to_image = [image for image, caps in enumerate(all_captions) for _ in caps]  # (T,)
        texts = [caption for caps in all_captions for caption in caps]

        # 2. Every caption, encoded on every rank: the same sim and top k everywhere.
        text, text_mask, text_feat = self._encode_texts(texts, device)  # (T, Lt, D), (T, Lt), (T, E)
        sim = image_feat @ text_feat.T  # (I, T)

        # 3. ITM on the top-k pairs whose image this rank holds.
        i2t, t2i = top_k_pairs(sim, settings.k_test, offset, len(keys))
        scored = [
            self._itm_scores(pairs, vision_local, offset, text, text_mask).cpu() for pairs in (i2t, t2i)
        ]
        everything = context.gather([scored])
        metrics: dict[str, float] | None = None
        if context.is_main:
            i2t_all = concat_pairs([part[0] for part in everything])
            t2i_all = concat_pairs([part[1] for part in everything])
            metrics = retrieval_metrics(sim.float().cpu(), i2t_all, t2i_all, text_to_image)
            context.output.mkdir(parents=True, exist_ok=True)
            (context.output / RESULTS_FILE).write_text(json.dumps(
                {"metrics": metrics, "settings": asdict(settings)}, indent=2
            ))
        return context.broadcast(metrics)

    def _encode_texts(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """States (T, Lt, D), masks (T, Lt) and ITC features (T, E) of `texts`, padded to one length."""
        model, settings = self.model, self.settings
        states, masks, feats = [], [], []
        for start in range(0, len(texts), settings.eval_batch_size):
            chunk = texts[start : start + settings.eval_batch_size]
            tokens = tokenize(self.tokenizer, chunk, settings.max_text_length, pad_to_max=True)
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            encoded = model.encode_text(ids, mask)  # (t, Lt, D)
            states.append(encoded)
            masks.append(mask)
            feats.append(text_feature(model, encoded).float())
        return torch.cat(states), torch.cat(masks), torch.cat(feats)

    def _itm_scores(
        self,
        pairs: tuple[torch.Tensor, torch.Tensor],
        vision_local: torch.Tensor | None,
        offset: int,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> RankedPairs:
        """The ITM match logit of each (global image, global text) pair; the images are this rank's."""
        images, texts = pairs
        scores = []
        for start in range(0, images.numel(), self.settings.eval_batch_size):
            image_rows = images[start : start + self.settings.eval_batch_size] - offset  # local rows
            text_rows = texts[start : start + self.settings.eval_batch_size]
            fused = self.model.fuse(text[text_rows], text_mask[text_rows], vision_local[image_rows])
            scores.append(self.model.itm_head(fused.text[:, 0])[:, MATCH].float())  # (p,)
        score = torch.cat(scores) if scores else torch.empty(0, device=images.device)
        return RankedPairs(images, texts, score)


def top_k_pairs(
    sim: torch.Tensor, k_test: int, offset: int, count: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The pairs to re-score whose image is one of images [offset, offset + count).

    sim (I, T). Image -> text: each of those images with its top min(k_test, T) captions.
    Text -> image: each caption with those of its top min(k_test, I) images that lie in the range.
    Returns ((images, texts), (images, texts)) of global indices, each (P,) long.
    """
    num_images, num_texts = sim.shape
    device = sim.device
    k_texts, k_images = min(k_test, num_texts), min(k_test, num_images)
    rows = sim[offset : offset + count]  # (n, T)
    top_texts = rows.topk(k_texts, dim=1).indices  # (n, k)
    i2t_images = (torch.arange(count, device=device) + offset).repeat_interleave(k_texts)
    top_images = sim.T.topk(k_images, dim=1).indices  # (T, k)
    mine = (top_images >= offset) & (top_images < offset + count)  # (T, k)
    t2i_texts = torch.arange(num_texts, device=device)[:, None].expand_as(top_images)[mine]
    return (i2t_images, top_texts.flatten()), (top_images[mine], t2i_texts)


def concat_pairs(parts: Sequence[RankedPairs]) -> RankedPairs:
    return RankedPairs(*(torch.cat([getattr(p, name) for p in parts]) for name in ("images", "texts", "scores")))


def score_matrix(pairs: RankedPairs, num_images: int, num_texts: int) -> torch.Tensor:
    """(I, T) with each re-scored pair's ITM score and OUTSIDE_TOP_K everywhere else."""
    scores = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    scores[pairs.images, pairs.texts] = pairs.scores
    return scores


def retrieval_metrics(
    sim: torch.Tensor, i2t: RankedPairs, t2i: RankedPairs, text_to_image: Sequence[int]
) -> dict[str, float]:
    """Recall of the re-ranked matrices, of the ITC ranking alone (`itc_*`), the baselines and counts."""
    num_images, num_texts = sim.shape
    text_recall = retrieval_recall(score_matrix(i2t, num_images, num_texts), text_to_image)
    image_recall = retrieval_recall(score_matrix(t2i, num_images, num_texts), text_to_image)
    metrics = {key: value for key, value in text_recall.items() if key.startswith("txt_")}
    metrics |= {key: value for key, value in image_recall.items() if key.startswith("img_")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["r1_mean"] = (metrics["txt_r1"] + metrics["img_r1"]) / 2
    itc = retrieval_recall(sim, text_to_image)
    metrics |= {f"itc_{key}": value for key, value in itc.items()}
    metrics["itc_r1_mean"] = (itc["txt_r1"] + itc["img_r1"]) / 2
    metrics["baseline"] = random_recall_at_1(num_images, text_to_image)["r_mean"]  # mean random R@1
    texts_per_image = torch.bincount(torch.as_tensor(text_to_image), minlength=num_images).tolist()
    metrics["baseline_r_mean"] = random_ranking_recall(texts_per_image)["r_mean"]
    metrics["count"] = float(num_images)
    metrics["num_texts"] = float(num_texts)
    return metrics


def random_ranking_recall(texts_per_image: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected recall (percent) of a uniformly random ranking, exactly, with the keys of retrieval_recall.

    With I images and T = sum(texts_per_image) captions:
    image -> text: an image with p of the T captions misses the top K only when all K ranked first
    are other captions, so P(hit) = 1 - C(T - p, K) / C(T, K) (K clipped to T), averaged over images;
    text -> image: a caption's one image is among the top K of I with probability min(K, I) / I.
    """
    counts = list(texts_per_image)
    if not counts or any(p < 1 for p in counts):
        raise ValueError(f"every image needs at least one caption; got texts_per_image {counts[:10]}")
    num_images, num_texts = len(counts), sum(counts)
    result: dict[str, float] = {}
    for k in ks:
        kt = min(k, num_texts)
        hits = [1 - math.comb(num_texts - p, kt) / math.comb(num_texts, kt) for p in counts]
        result[f"txt_r{k}"] = 100.0 * sum(hits) / num_images
        result[f"img_r{k}"] = 100.0 * min(k, num_images) / num_images
    for name in ("txt", "img"):
        result[f"{name}_r_mean"] = sum(result[f"{name}_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def _check_captions(all_captions: list[list[str]], keys: list[str]) -> None:
    if not all_captions:
        raise ValueError("the retrieval evaluation split gave no image on any rank; check the eval shards")
    empty = [key for key, caps in zip(keys, all_captions, strict=True) if not caps]
    if empty:
        raise ValueError(
            f"{len(empty)} evaluation images have no caption in meta['captions'] (e.g. {empty[:5]}); "
            "retrieval evaluation needs the val/test split of a Karpathy conversion (all captions per image)"
        )
