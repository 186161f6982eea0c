"""COCO captioning (Karpathy split): ViT -> decoder, trained with cross-entropy, then with SCST.

The caption decoder attends to the vision states alone (no text encoder, no fusion) and reads a
text prompt first, as mPLUG does: the decoder input is `[CLS] a picture of <caption> [SEP]`, the
prompt's positions carry no loss, and generation starts after it. The prompt lives inside
`prompted_decode`, a decode callable that inserts the prompt tokens after BOS and drops their
positions from the logits, so `finetune.generation` (which starts every sequence from a lone BOS)
and the training loss see the plain `[CLS] caption [SEP]` layout the loader tokenised.

Training runs in two stages of fine-tuning:

1. token cross-entropy on the caption (the train split holds one sample per caption), with
   optional label smoothing;
2. SCST (`scst: true`): `scst_samples` captions are drawn per image; each is rewarded with its
   CIDEr-D against the image's references (`meta["captions"]`), the baseline is the mean reward of
   the samples of the same image, and the loss is -(reward - baseline) * log p(sample), averaged.

CIDEr-D needs document frequencies over a reference corpus. The trainer should hand the training
references over once with `set_reference_corpus` (one list of captions per training image), as
SCST papers do. When none was set, each step's frequencies come from the reference sets of that
step's batch: a noisier idf (over a few images rather than the whole split), chosen because it
keeps the reward a function of the batch alone, so resumed and multi-rank runs reward a sample
as an uninterrupted single-rank run would.

Evaluation decodes one caption per image with beam search (5 beams, 8 to 25 tokens after the
prompt), writes the COCO results file `caption_results.json` and scores it with pycocoevalcap
(BLEU_1..4, METEOR, ROUGE_L, CIDEr, and SPICE when `spice_jars` is set). The `baseline` is the
CIDEr of one constant caption for every image: the evaluated split's most frequent reference
(compared lowercased without punctuation; ties go to the first seen, images in image-id order).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune.generation import beam_search, sample
from finetune.metrics.caption_scores import caption_scores, write_caption_results
from finetune.metrics.cider_d import CiderD, tokenize
from finetune.tasks.base import EvalContext, TaskModel, TaskOutput
from pretrain.models.mplug import MPLUG
from pretrain.objectives.distributed import token_share
from pretrain.objectives.mlm import IGNORE

log = logging.getLogger("mplug.finetune")

RESULTS_FILE = "caption_results.json"
BASELINE_METRIC = "CIDEr"  # the baseline is scored on the headline metric only


@dataclass
class CaptionSettings:
    prompt: str = "a picture of "  # read by the decoder before every caption; carries no loss
    beams: int = 5
    min_length: int = 8  # generated tokens after the prompt before EOS may end a caption
    max_length: int = 25  # generated tokens after the prompt, EOS included
    length_penalty: float = 1.0  # beam scores are sum log p / length ** length_penalty
    label_smoothing: float = 0.0  # of the cross-entropy stage
    scst: bool = False  # second fine-tuning stage: self-critical sequence training
    scst_samples: int = 5  # captions sampled per image; their mean reward is the baseline
    scst_max_length: int = 25  # tokens per sampled caption, EOS included
    spice_jars: str | None = None  # directory with the Stanford CoreNLP 3.6.0 jars; None skips SPICE


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels (B, L) of `[CLS] caption [SEP] pad..`: position t predicts token t + 1.

    The last position and every position followed by padding are IGNORE.
    """
    next_ids = input_ids[:, 1:]  # (B, L-1)
    next_valid = attention_mask[:, 1:].bool()
    labels = torch.where(next_valid, next_ids, torch.full_like(next_ids, IGNORE))
    return F.pad(labels, (0, 1), value=IGNORE)  # (B, L)


def scst_loss(log_probs: torch.Tensor, rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """-(reward - baseline) * log p(sample), averaged over all samples.

    log_probs and rewards are (B * samples,), the samples of an input adjacent (as
    `generation.sample` orders them); the baseline of a sample is the mean reward of its input's
    samples, so the advantages of one input sum to zero.
    """
    if log_probs.shape != rewards.shape or log_probs.dim() != 1 or log_probs.numel() % samples:
        raise ValueError(f"log_probs and rewards must both be (B * samples,) with samples={samples}, got "
                         f"{tuple(log_probs.shape)} and {tuple(rewards.shape)}")
    per_input = rewards.view(-1, samples)  # (B, S)
    advantage = (per_input - per_input.mean(dim=1, keepdim=True)).view(-1)  # (B*S,)
    return -(advantage.detach() * log_probs).mean()


def normalize_caption(caption: str) -> str:
    """Lowercased, ASCII punctuation deleted, whitespace collapsed: "A dog's toy." -> "a dogs toy"."""
    return " ".join(tokenize(caption))


def most_common_caption(reference_sets: Iterable[Sequence[str]]) -> str:
    """The most frequent normalised caption over all reference sets; a tie goes to the first seen."""
    counts: Counter[str] = Counter(normalize_caption(c) for references in reference_sets for c in references)
    if not counts:
        raise ValueError("no reference captions to pick a constant caption from; every image needs references")
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts, in insertion order


class CaptionTask(TaskModel):
    name = "caption"
    metric = "CIDEr"
    Settings = CaptionSettings

    def __init__(self, model: MPLUG, settings: CaptionSettings, tokenizer):
        super().__init__(model, settings, tokenizer)
        text = model.cfg.text
        prompt = tokenizer(settings.prompt, add_special_tokens=False)["input_ids"]
        _check_settings(settings, text.max_positions, len(prompt))
        self.bos_id, self.eos_id, self.pad_id = text.cls_id, text.sep_id, text.pad_id
        # A buffer, so it follows the model to its device; not saved: it is the tokenizer's, not a weight.
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)  # (P,)
        self.cider: CiderD | None = None  # the SCST reward's, from set_reference_corpus
        self._warned_batch_corpus = False

    def loader_fields(self, train: bool) -> dict[str, Any]:
        return {"augment": "finetune" if train else "eval", "text_field": "txt"}

    def set_reference_corpus(self, reference_sets: Iterable[Sequence[str]]) -> None:
        """Fix the SCST reward's CIDEr-D document frequencies: one list of captions per training image."""
        self.cider = CiderD(list(reference_sets))

    def prompted_decode(
        self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
    ) -> torch.Tensor:
        """`MPLUG.decode` with the prompt read after BOS: ids (N, T) -> logits (N, T, V), where
        position t predicts ids[:, t + 1] (position 0, the BOS, predicts the first caption token)."""
        rows, length = ids.shape[0], self.prompt_ids.numel()
        prompt = self.prompt_ids.to(ids.device).expand(rows, length)  # (N, P)
        full_ids = torch.cat([ids[:, :1], prompt, ids[:, 1:]], dim=1)  # (N, T + P): BOS, prompt, the rest
        full_mask = torch.cat([mask[:, :1], mask.new_ones(rows, length), mask[:, 1:]], dim=1)
        logits = self.model.decode(full_ids, full_mask, memory, memory_mask)  # (N, T + P, V)
        return logits[:, length:]  # (N, T, V): the last prompt position stands in for the BOS

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's memory: vision states (B, Lv, D) and an all-ones mask (B, Lv)."""
        vision = self.model.encode_image(images)  # (B, Lv, D)
        return vision, torch.ones(vision.shape[:2], dtype=torch.long, device=vision.device)

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        if self.settings.scst:
            return self._scst_forward(batch)
        memory, memory_mask = self.encode(batch["images"])
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        logits = self.prompted_decode(input_ids, attention_mask, memory, memory_mask)  # (B, L, V)
        labels = caption_labels(input_ids, attention_mask)  # (B, L)
        # Token mean over the global batch (token_share), so every world size gives one loss.
        share = token_share((labels != IGNORE).sum())
        if not bool(share > 0):  # no caption token in the whole global batch
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum", label_smoothing=self.settings.label_smoothing) / share
        return TaskOutput(loss, {"caption": loss.detach()})

    def _scst_forward(self, batch: dict[str, Any]) -> TaskOutput:
        references = _references(batch["meta"])
        samples = self.settings.scst_samples
        memory, memory_mask = self.encode(batch["images"])
        drawn = sample(self.prompted_decode, memory, memory_mask, bos_id=self.bos_id, eos_id=self.eos_id,
                       pad_id=self.pad_id, max_length=self.settings.scst_max_length, num_samples=samples)
        captions = self.decode_captions(drawn.sequences)  # B * S, the samples of an image adjacent
        sample_references = [refs for refs in references for _ in range(samples)]
        rewards = torch.as_tensor(self.rewards(captions, sample_references), dtype=drawn.log_probs.dtype,
                                  device=drawn.log_probs.device)  # (B*S,)
        loss = scst_loss(drawn.log_probs, rewards, samples)
        return TaskOutput(loss, {"scst": loss.detach(), "reward": rewards.mean()})

    def rewards(self, captions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each caption against its reference set, under the reference corpus when one
        was set, else with document frequencies from these reference sets (see the module docstring)."""
        cider = self.cider
        if cider is None:
            if not self._warned_batch_corpus:
                log.warning("SCST: no reference corpus set (CaptionTask.set_reference_corpus); CIDEr-D document "
                            "frequencies come from each batch's references")
                self._warned_batch_corpus = True
            cider = CiderD(list(dict.fromkeys(tuple(refs) for refs in references)))
        return cider.score(list(captions), [list(refs) for refs in references])

    def decode_captions(self, sequences: torch.Tensor) -> list[str]:
        """Token rows (N, L) after the prompt -> caption strings, special tokens and pad dropped."""
        return [text.strip() for text in self.tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=True)]

    @torch.no_grad()
    def generate(self, images: torch.Tensor) -> list[str]:
        """One beam-searched caption per image (B, 3, S, S), without the prompt."""
        memory, memory_mask = self.encode(images)
        settings = self.settings
        out = beam_search(self.prompted_decode, memory, memory_mask, bos_id=self.bos_id, eos_id=self.eos_id,
                          pad_id=self.pad_id, beams=settings.beams, max_length=settings.max_length,
                          min_length=settings.min_length, length_penalty=settings.length_penalty)
        return self.decode_captions(out.sequences)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        was_training = self.training
        self.eval()
        try:
            records = []
            for batch in batches:
                captions = self.generate(batch["images"])
                for meta, caption in zip(batch["meta"], captions, strict=True):
                    records.append({"image_id": _image_id(meta), "caption": caption, "references": _captions(meta)})
        finally:
            self.train(was_training)
        records = context.gather(records)
        metrics: dict[str, float] | None = None
        if context.is_main:
            metrics = self._score(records, context)
        return context.broadcast(metrics)

    def _score(self, records: list[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        if not records:
            raise ValueError("the evaluation split produced no captions; it needs at least one image")
        # Image-id order, so the results (and the baseline's tie-break) do not depend on the world size;
        # an image met twice (a padded shard) counts once.
        records = sorted(records, key=lambda r: (isinstance(r["image_id"], str), r["image_id"]))
        predictions: dict[Any, str] = {}
        references: dict[Any, list[str]] = {}
        for record in records:
            predictions.setdefault(record["image_id"], record["caption"])
            references.setdefault(record["image_id"], record["references"])
        write_caption_results(context.output / RESULTS_FILE, predictions)
        metrics = caption_scores(predictions, references, spice_jars=self.settings.spice_jars)
        constant = most_common_caption(references.values())
        baseline = caption_scores(dict.fromkeys(predictions, constant), references)[BASELINE_METRIC]
        log.info("caption baseline: the constant caption %r scores %s %.4f", constant, BASELINE_METRIC, baseline)
        return {**metrics, "baseline": baseline, "count": float(len(predictions))}


def _check_settings(settings: CaptionSettings, max_positions: int, prompt_length: int) -> None:
    if settings.beams < 1:
        raise ValueError(f"beams must be >= 1 (1 is greedy decoding), got {settings.beams}")
    if not 0 <= settings.min_length <= settings.max_length or settings.max_length < 1:
        raise ValueError(f"need 0 <= min_length <= max_length and max_length >= 1, got min_length="
                         f"{settings.min_length}, max_length={settings.max_length}")
    if settings.scst_samples < 2:
        raise ValueError(f"scst_samples must be >= 2: the baseline is the mean reward of an image's samples, "
                         f"so one sample has no advantage; got {settings.scst_samples}")
    if settings.scst_max_length < 1:
        raise ValueError(f"scst_max_length must be >= 1, got {settings.scst_max_length}")
    if not 0.0 <= settings.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {settings.label_smoothing}")
    # The decoder sees BOS + prompt + the generated tokens: all must fit its position embeddings.
    longest = 1 + prompt_length + max(settings.max_length, settings.scst_max_length)
    if longest > max_positions:
        raise ValueError(f"BOS + prompt ({prompt_length} tokens) + max_length {settings.max_length} / scst_max_length "
                         f"{settings.scst_max_length} = {longest} positions exceed the decoder's max_positions "
                         f"{max_positions}; shorten the prompt or the lengths")


def _image_id(meta: dict[str, Any]) -> Any:
    if "image_id" not in meta:
        raise KeyError(f"caption evaluation needs meta['image_id'] on every sample; got keys {sorted(meta)} "
                       "(convert the split with data_prep.convert.karpathy)")
    return meta["image_id"]


def _captions(meta: dict[str, Any]) -> list[str]:
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions:
        raise KeyError(f"captioning needs meta['captions'], the image's reference captions, on every sample; got "
                       f"{captions!r} in a sample with keys {sorted(meta)} (convert with data_prep.convert.karpathy)")
    return captions


def _references(metas: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [_captions(meta) for meta in metas]
