"""Visual grounding (RefCOCO, RefCOCO+, RefCOCOg): the box a referring expression names, as 4 tokens.

    image --vision--> v (B, Lv, D)
    expression --text_encoder--> l --fusion(l, v)--> [v ; l] --decoder--> cx cy w h (4 bin tokens)

The box (cx, cy, w, h), normalised to [0, 1] by the input image's size, is quantised into
`bins = image_size + 1` bins per coordinate (`finetune.metrics.boxes.quantize_box`). The bin tokens
are new entries appended after the text vocabulary of the decoder: its word embedding and its tied
LM head grow by `bins` rows (`GroundingTask.add_bin_tokens`); the text encoder keeps its own
vocabulary. Bin k of the box has token id `text_vocab + k`.

Training: teacher forcing on `[CLS] t1 t2 t3` (the output after t4 would carry no label), label
t1..t4, cross-entropy over the bin tokens only (mPLUG masks every other token out of the softmax
the same way). Each token's cross-entropy is multiplied by a detached weight from the box error,
which focuses training on the boxes that are far off:

    p_k = softmax over the bins at box token k          (B, 4, bins)
    e_k = sum_j p_k(j) * j / (bins - 1)                  expected coordinate k, in [0, 1]
    w_k = 1 + l1_weight * |e_k - g_k| + giou_weight * (1 - GIoU(e, g))
    loss = sum_{b,k} w_bk * CE_bk / (number of box tokens in the global batch)

where g is the ground-truth (cx, cy, w, h), L1 is per coordinate and GIoU per box (so the weight
of a token lies in [1, 1 + l1_weight + 2 * giou_weight]). The released mPLUG weights the CE by the
*product* L1 * (1 - GIoU) of the argmax box: a token whose argmax is right gets no loss at all,
and the expected box gives a smoother signal than the argmax, so both are changed here.

Evaluation: greedy decoding of exactly 4 tokens with the vocabulary masked to the bin tokens,
dequantised and clipped to the image; accuracy is the percentage of expressions whose box has
IoU >= `iou_threshold` (0.5) with the ground truth. IoU is the same in the input image and in the
original one (a resize scales both boxes alike).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.generation import greedy
from finetune.metrics.boxes import (
    BOX_DIM,
    box_iou,
    cxcywh_to_xyxy,
    dequantize_box,
    generalized_box_iou,
    quantize_box,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from finetune.tasks.base import EvalContext, TaskModel, TaskOutput
from pretrain.config.schema import Config
from pretrain.models.mplug import MPLUG
from pretrain.models.text import INIT_STD, TextDecoder
from pretrain.objectives.distributed import token_share

RESULTS_FILE = "grounding_results.json"
PERCENT = 100.0
TEXT_FIELD = "sentence"  # the referring expression in a refcoco shard's KEY.json
BOX_FIELD = "box"  # its [x, y, w, h] box in pixels of the original image


@dataclass
class GroundingSettings:
    l1_weight: float = 1.0  # weight of the per-coordinate L1 error of the expected box in the CE weight
    giou_weight: float = 1.0  # weight of 1 - GIoU of the expected box in the CE weight
    iou_threshold: float = 0.5  # a predicted box is correct at IoU >= this


@dataclass
class BoxLoss:
    """The weighted loss of one micro-batch and its parts, for logging."""

    loss: torch.Tensor  # scalar: sum of weight * CE over box tokens / this rank's share of tokens
    ce: torch.Tensor  # (B, 4) per-token cross-entropy over the bins
    weight: torch.Tensor  # (B, 4) the weights, without grad
    l1: torch.Tensor  # (B, 4) |expected - target| per coordinate, without grad
    giou: torch.Tensor  # (B,) GIoU of the expected box with the target, without grad


def grow_decoder_vocabulary(decoder: TextDecoder, added: int, std: float = INIT_STD) -> None:
    """Append `added` rows to the decoder's word embedding and its tied LM head, initialised as BERT
    does (weights N(0, std), output bias 0); the existing rows are kept unchanged."""
    if added < 1:
        raise ValueError(f"the decoder vocabulary grows by at least 1 token, got added={added}")
    old = decoder.embeddings.word_embeddings
    rows, width = old.weight.shape
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    grown = nn.Embedding(rows + added, width, padding_idx=old.padding_idx, **factory)
    predictions = decoder.lm_head.head.predictions
    bias = torch.zeros(rows + added, **factory)  # (V + added,)
    with torch.no_grad():
        grown.weight[:rows] = old.weight
        nn.init.normal_(grown.weight[rows:], std=std)
        bias[:rows] = predictions.decoder.bias
    decoder.embeddings.word_embeddings = grown
    # The output matrix IS the embedding (the tie), and BERT's two bias names share one tensor, as
    # `MLMHead` sets them up; the Linear is made on the meta device since both its tensors are replaced.
    head = nn.Linear(width, rows + added, device="meta")
    head.weight = grown.weight
    head.bias = nn.Parameter(bias)
    predictions.decoder = head
    predictions.bias = head.bias


def box_loss(
    bin_logits: torch.Tensor, target_bins: torch.Tensor, target: torch.Tensor, *, l1_weight: float,
    giou_weight: float,
) -> BoxLoss:
    """The error-weighted box-token cross-entropy (see the module docstring).

    bin_logits (B, 4, bins): the decoder's logits restricted to the bin tokens; target_bins (B, 4)
    the quantised ground truth in [0, bins); target (B, 4) the ground truth (cx, cy, w, h) in [0, 1].
    """
    if bin_logits.dim() != 3 or bin_logits.shape[1] != BOX_DIM or target_bins.shape != bin_logits.shape[:2]:
        raise ValueError(f"bin_logits must be (B, 4, bins) and target_bins (B, 4), got "
                         f"{tuple(bin_logits.shape)} and {tuple(target_bins.shape)}")
    bins = bin_logits.shape[-1]
    log_probs = F.log_softmax(bin_logits.float(), dim=-1)  # (B, 4, bins)
    ce = -log_probs.gather(-1, target_bins[..., None]).squeeze(-1)  # (B, 4)
    with torch.no_grad():  # the weights are constants of the loss
        values = torch.linspace(0.0, 1.0, bins, device=bin_logits.device)  # (bins,) the value of each bin
        expected = log_probs.exp() @ values  # (B, 4) the expected (cx, cy, w, h)
        target = target.float()
        l1 = (expected - target).abs()  # (B, 4)
        giou = generalized_box_iou(cxcywh_to_xyxy(expected), cxcywh_to_xyxy(target))  # (B,)
        weight = 1.0 + l1_weight * l1 + giou_weight * (1.0 - giou)[:, None]  # (B, 4)
    share = token_share(torch.tensor(float(ce.numel()), device=ce.device))
    return BoxLoss((weight * ce).sum() / share, ce, weight, l1, giou)


def centred_box_baseline(gt_xywh: torch.Tensor, threshold: float = 0.5) -> float:
    """Accuracy (percent) of one fixed guess for every expression: the box centred in the image whose
    width and height are the mean normalised width and height of the ground-truth boxes given.

    gt_xywh (N, 4): ground-truth boxes normalised by their image's size, (x, y, w, h) in [0, 1].
    """
    if gt_xywh.dim() != 2 or gt_xywh.shape[1] != BOX_DIM or gt_xywh.shape[0] == 0:
        raise ValueError(f"gt_xywh must be (N, 4) with N >= 1 normalised boxes, got {tuple(gt_xywh.shape)}")
    gt = gt_xywh.double()
    width, height = gt[:, 2].mean(), gt[:, 3].mean()
    centred = torch.stack([0.5 - width / 2, 0.5 - height / 2, width, height])  # (4,)
    iou = box_iou(xywh_to_xyxy(centred.expand_as(gt)), xywh_to_xyxy(gt))  # (N,)
    return PERCENT * (iou >= threshold).double().mean().item()


def tokens_to_boxes(tokens: torch.Tensor, first_bin: int, bins: int, height: int, width: int) -> torch.Tensor:
    """Generated box tokens (B, 4) -> xyxy boxes (B, 4) in pixels of the (height x width) input image,
    clipped to it (a box reaching past the border can only lose IoU by the part outside)."""
    if tokens.dim() != 2 or tokens.shape[1] != BOX_DIM:
        raise ValueError(f"expected 4 box tokens per expression, got tokens of shape {tuple(tokens.shape)}")
    cxcywh = dequantize_box(tokens - first_bin, bins)  # (B, 4) in [0, 1]
    scale = torch.tensor([width, height, width, height], dtype=cxcywh.dtype, device=cxcywh.device)
    xyxy = cxcywh_to_xyxy(cxcywh).clamp(0.0, 1.0)  # (B, 4) clipped to the image
    return xyxy * scale


def grounding_metrics(records: Sequence[dict[str, Any]], threshold: float) -> dict[str, float]:
    """accuracy (percent at IoU >= threshold), mean_iou (in [0, 1]), baseline (percent, see
    `centred_box_baseline`) and count, from per-expression records with "iou", "gt" and "image_size"."""
    iou = torch.tensor([record["iou"] for record in records], dtype=torch.float64)  # (N,)
    gt = torch.tensor([record["gt"] for record in records], dtype=torch.float64)  # (N, 4) xywh pixels
    size = torch.tensor([record["image_size"] for record in records], dtype=torch.float64)  # (N, 2) w, h
    normalised = gt / size.repeat(1, 2)  # (N, 4)
    return {
        "accuracy": PERCENT * (iou >= threshold).double().mean().item(),
        "mean_iou": iou.mean().item(),
        "baseline": centred_box_baseline(normalised, threshold),
        "count": float(len(records)),
    }


class GroundingTask(TaskModel):
    name = "grounding"
    metric = "accuracy"
    Settings = GroundingSettings

    def __init__(self, model: MPLUG, settings: GroundingSettings, tokenizer):
        super().__init__(model, settings, tokenizer)
        if not 0.0 <= settings.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {settings.iou_threshold}")
        self.bins = model.cfg.vision.image_size + 1  # mPLUG: image_res + 1 bins per coordinate
        self.first_bin = model.cfg.text.vocab_size  # bin k is token first_bin + k
        self.add_bin_tokens()

    def add_bin_tokens(self) -> None:
        """Grow the decoder's word embedding and tied LM head by `bins` rows (once: a model that
        already has them, e.g. a resumed grounding model, is left as it is)."""
        rows = self.model.decoder.embeddings.word_embeddings.num_embeddings
        if rows == self.first_bin + self.bins:
            return
        if rows != self.first_bin:
            raise ValueError(
                f"the decoder has {rows} token rows; a grounding model needs the text vocabulary "
                f"({self.first_bin}, model.text.vocab_size) before its {self.bins} bin tokens are added, or "
                f"{self.first_bin + self.bins} after")
        grow_decoder_vocabulary(self.model.decoder, self.bins)

    def model_config(self, config: Config) -> Config:
        """The bins as decoder-only tokens, so a package of this model rebuilds with them."""
        text = dataclasses.replace(config.model.text, decoder_extra_tokens=self.bins)
        return dataclasses.replace(config, model=dataclasses.replace(config.model, text=text))

    @property
    def bin_ids(self) -> torch.Tensor:
        """(bins,) the token ids of the bins, on the model's device."""
        device = self.model.decoder.embeddings.word_embeddings.weight.device
        return torch.arange(self.first_bin, self.first_bin + self.bins, device=device)

    def loader_fields(self, train: bool) -> dict[str, Any]:
        # A crop could cut the box out and RandAugment shears and moves it: training resizes the
        # whole image and only flips (which mirror the box and swap "left"/"right" in the text).
        fields = {"text_field": TEXT_FIELD, "box_field": BOX_FIELD}
        if train:
            return {**fields, "augment": "finetune", "crop": False, "flip": True, "randaugment": False}
        return {**fields, "augment": "eval"}

    def memory(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """[v ; fused expression] (B, Lv + Lt, D) and its mask (B, Lv + Lt): what the decoder attends to."""
        vision = self.model.encode_image(batch["images"])  # (B, Lv, D)
        mask = batch["attention_mask"]  # (B, Lt)
        fused = self.model.fuse(self.model.encode_text(batch["input_ids"], mask), mask, vision)
        memory_mask = torch.cat([torch.ones_like(vision[:, :, 0], dtype=mask.dtype), mask], dim=1)
        return fused.joint(), memory_mask

    def pixel_boxes(self, batch: dict[str, Any]) -> torch.Tensor:
        """The ground-truth boxes (B, 4) xywh in pixels of the input image (the loader moved them there)."""
        missing = [key for key, meta in zip(batch["keys"], batch["meta"], strict=True) if BOX_FIELD not in meta]
        if missing:
            raise ValueError(f"samples {missing[:5]} have no {BOX_FIELD!r} in their KEY.json; grounding needs "
                             f"[x, y, w, h] boxes (data_prep/convert/refcoco.py writes them)")
        boxes = [meta[BOX_FIELD] for meta in batch["meta"]]
        return torch.tensor(boxes, dtype=torch.float32, device=batch["images"].device)  # (B, 4)

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        images = batch["images"]
        height, width = images.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=images.device)
        target = xyxy_to_cxcywh(xywh_to_xyxy(self.pixel_boxes(batch)) / scale).clamp(0.0, 1.0)  # (B, 4)
        target_bins = quantize_box(target, self.bins)  # (B, 4) in [0, bins)
        memory, memory_mask = self.memory(batch)

        bos = torch.full_like(target_bins[:, :1], self.model.cfg.text.cls_id)  # (B, 1)
        decoder_ids = torch.cat([bos, target_bins[:, :-1] + self.first_bin], dim=1)  # (B, 4): [CLS] t1 t2 t3
        logits = self.model.decode(decoder_ids, torch.ones_like(decoder_ids), memory, memory_mask)  # (B, 4, V)
        bin_logits = logits[..., self.first_bin : self.first_bin + self.bins]  # (B, 4, bins)
        parts = box_loss(bin_logits, target_bins, target, l1_weight=self.settings.l1_weight,
                         giou_weight=self.settings.giou_weight)
        return TaskOutput(parts.loss, {
            "box_ce": parts.ce.mean().detach(),
            "box_l1": parts.l1.mean(),
            "box_giou": parts.giou.mean(),
            "box_weight": parts.weight.mean(),
        })

    @torch.no_grad()
    def predict_boxes(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 4) xyxy boxes in the input image's pixels: greedy decoding of 4 bin tokens."""
        text = self.model.cfg.text
        height, width = batch["images"].shape[-2:]
        memory, memory_mask = self.memory(batch)
        tokens = greedy(self.model.decode, memory, memory_mask, bos_id=text.cls_id, eos_id=text.sep_id,
                        pad_id=text.pad_id, max_length=BOX_DIM, allowed_ids=self.bin_ids,
                        fixed_length=BOX_DIM)  # (B, 4)
        return tokens_to_boxes(tokens, self.first_bin, self.bins, height, width)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        """accuracy, mean_iou, baseline and count over the split; rank 0 writes grounding_results.json,
        one record per expression: key, ref_id, sentence, box and gt ([x, y, w, h] in pixels of the
        original image when its KEY.json has image_size, else of the input image), image_size, iou."""
        was_training = self.training
        self.eval()
        records: list[dict[str, Any]] = []
        try:
            for batch in batches:
                height, width = batch["images"].shape[-2:]
                predicted = self.predict_boxes(batch)  # (B, 4) xyxy
                gt = self.pixel_boxes(batch)  # (B, 4) xywh
                iou = box_iou(predicted, xywh_to_xyxy(gt))  # (B,)
                records += self.records(batch, xyxy_to_xywh(predicted), gt, iou, (width, height))
        finally:
            self.train(was_training)

        gathered = context.gather(records)
        outcome: dict[str, Any] | str
        if not context.is_main:
            outcome = ""
        elif not gathered:
            outcome = "the evaluation split gave no samples on any rank; check the eval data path and its manifest"
        else:
            outcome = grounding_metrics(gathered, self.settings.iou_threshold)
            context.output.mkdir(parents=True, exist_ok=True)
            (context.output / RESULTS_FILE).write_text(json.dumps(gathered, indent=1) + "\n")
        outcome = context.broadcast(outcome)
        if isinstance(outcome, str):
            raise ValueError(outcome)
        return outcome

    @staticmethod
    def records(batch: dict[str, Any], predicted: torch.Tensor, gt: torch.Tensor, iou: torch.Tensor,
                input_size: tuple[int, int]) -> list[dict[str, Any]]:
        """Per-expression records; boxes (B, 4) xywh in input pixels are moved to the original image's."""
        out = []
        for row, meta in enumerate(batch["meta"]):
            size = meta.get("image_size") or list(input_size)  # [w, h]
            scale = torch.tensor([size[0] / input_size[0], size[1] / input_size[1]] * 2, dtype=torch.float64)
            out.append({
                "key": batch["keys"][row],
                "ref_id": meta.get("ref_id"),
                "sentence": batch["texts"][row],
                "box": (predicted[row].double().cpu() * scale).tolist(),
                "gt": (gt[row].double().cpu() * scale).tolist(),
                "image_size": list(size),
                "iou": float(iou[row]),
            })
        return out
