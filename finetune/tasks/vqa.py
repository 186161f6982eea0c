"""Visual question answering (VQA v2, VG QA): a generated answer scored by the official VQA accuracy.

    image --vision--> v (B, Lv, D)
    question --text_encoder--> l (B, Lq, D) --fusion(l, v)--> [v ; l] --decoder--> [CLS] answer [SEP]

Training (ALBEF/mPLUG's answer loss): a question has several unique answers, each weighted by its
share of the annotators (meta["answers"], meta["weights"]: [yes x7, no x3] -> [0.7, 0.3]). Every
answer becomes its own decoder target `[CLS] answer [SEP]` over a copy of its question's memory;
its loss is the cross-entropy summed over its tokens ([SEP] included), times its weight, and the
weighted losses are summed and divided by the number of questions. The answer starts right after
[CLS]: there is no prompt.

Evaluation answers each question either by beam search (`inference: generate`, beams 5, at most
10 tokens) or by ranking a closed answer list (`inference: rank`, ALBEF/mPLUG's first-token top-k
re-scored by full likelihood), then scores the answers with the official VQA accuracy against
meta["annotator_answers"] and writes the challenge's `vqa_results.json`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from data_prep.batch import tokenize
from finetune.generation import beam_search, rank_answers, sequence_log_likelihood
from finetune.metrics.vqa_accuracy import normalize_answer, vqa_accuracy, write_vqa_results
from finetune.tasks.base import EvalContext, TaskModel, TaskOutput
from pretrain.models.mplug import MPLUG

log = logging.getLogger(__name__)

INFERENCE_MODES = ("generate", "rank")
RESULTS_FILE = "vqa_results.json"  # the VQA challenge's result format, under context.output
EXAMPLES_IN_MESSAGES = 5  # answers or keys named in an error or a warning


@dataclass
class VQASettings:
    """The `task:` section of a VQA fine-tuning config (defaults: mPLUG's VQA recipe)."""

    # Question word pieces with [CLS] and [SEP]; mPLUG cuts questions at 30 words.
    max_question_length: int = 40
    # Answer word pieces + [SEP] kept in training ([CLS] not counted): as many as decoding generates.
    max_answer_length: int = 10
    inference: str = "generate"  # "generate" (beam search) or "rank" (over `answer_list`)
    beams: int = 5
    max_length: int = 10  # tokens beam search generates, [SEP] included
    min_length: int = 1  # word pieces before [SEP]: an empty answer is never right
    answer_list: str | None = None  # JSON list of candidate answers; needed by inference "rank"
    rank_k: int = 128  # answers re-scored by full likelihood after the first-token ranking

    def __post_init__(self) -> None:
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"task.inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        if self.inference == "rank" and not self.answer_list:
            raise ValueError(
                "task.inference is 'rank' but task.answer_list is not set; give the path of a JSON "
                "list of candidate answers (ALBEF/mPLUG's answer_list.json: the most frequent "
                "training answers), or use task.inference=generate"
            )
        positive = {"max_question_length": self.max_question_length, "max_answer_length": self.max_answer_length,
                    "beams": self.beams, "max_length": self.max_length, "rank_k": self.rank_k}
        bad = {name: value for name, value in positive.items() if value < 1}
        if bad:
            raise ValueError(f"these task settings must be >= 1: {bad}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"task.min_length must be in [0, max_length={self.max_length}], got {self.min_length}")


def load_answer_list(path: str | Path) -> list[str]:
    """The candidate answers of a JSON file holding a non-empty list of strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer list {path} does not exist; task.answer_list must name a JSON list of answers")
    try:
        answers = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"answer list {path} is not valid JSON ({error}); expected a list of answer strings") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        seen = type(answers).__name__ if not isinstance(answers, list) else f"list of {len(answers)} items"
        raise ValueError(f"answer list {path} holds a {seen}; expected a non-empty JSON list of answer strings")
    return answers


def answer_targets(
    meta: Sequence[dict[str, Any]], keys: Sequence[str]
) -> tuple[list[str], list[float], list[int]]:
    """Every unique answer of the batch, its weight and the row of its question, flat in batch order."""
    answers: list[str] = []
    weights: list[float] = []
    owners: list[int] = []
    for row, (sample, key) in enumerate(zip(meta, keys, strict=True)):
        texts, shares = sample.get("answers"), sample.get("weights")
        if not texts:
            raise ValueError(
                f"VQA sample {key!r} has no answers (answers={texts!r}); training needs at least one "
                "annotated answer per question (test-split questions have none and cannot be trained on)"
            )
        if shares is None or len(shares) != len(texts):
            raise ValueError(
                f"VQA sample {key!r} has {len(texts)} answers but weights={shares!r}; each unique "
                "answer needs one weight, its share of the annotators (see data_prep/convert/vqa.py)"
            )
        answers.extend(str(text) for text in texts)
        weights.extend(float(share) for share in shares)
        owners.extend([row] * len(texts))
    return answers, weights, owners


def majority_answer(majorities: Iterable[str]) -> str:
    """The most frequent of the questions' majority answers; ties go to the one that sorts first."""
    counts = Counter(majorities)
    if not counts:
        raise ValueError("no majority answers to count: the evaluation split has no annotated questions")
    return min(counts, key=lambda answer: (-counts[answer], answer))


def _examples(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:EXAMPLES_IN_MESSAGES])
    return shown + (f" and {len(values) - EXAMPLES_IN_MESSAGES} more" if len(values) > EXAMPLES_IN_MESSAGES else "")


class VQATask(TaskModel):
    name: ClassVar[str] = "vqa"
    metric: ClassVar[str] = "accuracy"
    Settings: ClassVar[type] = VQASettings

    def __init__(self, model: MPLUG, settings: VQASettings | None, tokenizer):
        super().__init__(model, settings if settings is not None else VQASettings(), tokenizer)
        text = model.cfg.text
        self.bos_id, self.eos_id, self.pad_id = text.cls_id, text.sep_id, text.pad_id
        self.answer_list: list[str] | None = None
        self.answer_ids: torch.Tensor | None = None  # (A, La) `[CLS] answer [SEP] [PAD]..`
        self.answer_mask: torch.Tensor | None = None  # (A, La)
        if self.settings.inference == "rank":
            self.answer_list = load_answer_list(self.settings.answer_list)
            encoded = self._tokenize_answers(self.answer_list)
            self.answer_ids, self.answer_mask = encoded["input_ids"], encoded["attention_mask"]

    def loader_fields(self, train: bool) -> dict[str, Any]:
        return {**super().loader_fields(train), "text_field": "question",
                "max_text_length": self.settings.max_question_length}

    def _tokenize_answers(self, answers: Sequence[str]) -> dict[str, torch.Tensor]:
        # + 1 for [CLS]: max_answer_length counts the pieces and [SEP].
        return tokenize(self.tokenizer, answers, self.settings.max_answer_length + 1)

    def memory(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder memory [v ; fused question] (B, Lv + Lq, D) and its mask (B, Lv + Lq)."""
        mask = batch["attention_mask"]  # (B, Lq)
        vision = self.model.encode_image(batch["images"])  # (B, Lv, D)
        fused = self.model.fuse(self.model.encode_text(batch["input_ids"], mask), mask, vision)
        vision_mask = torch.ones(vision.shape[:2], dtype=mask.dtype, device=mask.device)  # (B, Lv)
        return fused.joint(), torch.cat([vision_mask, mask], dim=1)

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> TaskOutput:
        answers, weights, owners = answer_targets(batch["meta"], batch["keys"])
        memory, memory_mask = self.memory(batch)  # (B, M, D), (B, M)
        device = memory.device
        target = self._tokenize_answers(answers)
        owner = torch.tensor(owners, device=device)  # (N,) the question of each answer
        # Each answer decodes over its own copy of its question's memory: (N, M, D).
        log_likelihood = sequence_log_likelihood(
            self.model.decode, memory[owner], memory_mask[owner],
            target["input_ids"].to(device), target["attention_mask"].to(device),
        )  # (N,) summed over the answer's tokens and [SEP]
        weight = torch.tensor(weights, device=device, dtype=log_likelihood.dtype)  # (N,)
        loss = -(weight * log_likelihood).sum() / memory.shape[0]
        return TaskOutput(loss=loss, losses={"answer": loss.detach()})

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[str]:
        """The predicted answer of each question of the batch."""
        memory, memory_mask = self.memory(batch)
        s = self.settings
        if s.inference == "rank":
            ranked = rank_answers(self.model.decode, memory, memory_mask, self.answer_ids, self.answer_mask,
                                  k=s.rank_k, bos_id=self.bos_id)
            return [self.answer_list[index] for index in ranked.best.tolist()]
        generated = beam_search(
            self.model.decode, memory, memory_mask, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
            beams=s.beams, max_length=s.max_length, min_length=s.min_length,
        )
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                for tokens in generated.sequences.tolist()]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        """accuracy (percent), accuracy/<answer type>, baseline and count over the split read once.

        `baseline` is the accuracy of answering every question with the split's majority answer:
        the most frequent of the questions' majority answers (meta["answers"][0]) over the
        evaluated questions, so it is the score of the best constant answer a model could learn
        from the split's answer distribution alone.
        """
        was_training = self.training
        self.eval()
        records: list[dict[str, Any]] = []
        try:
            for batch in batches:
                for sample, answer in zip(batch["meta"], self.answer(batch), strict=True):
                    records.append({
                        "question_id": sample["question_id"], "answer": answer,
                        "annotator_answers": sample.get("annotator_answers") or [],
                        "majority": (sample.get("answers") or [None])[0],
                        "answer_type": sample.get("answer_type"),
                    })
        finally:
            self.train(was_training)
        gathered = context.gather(records)
        return context.on_main(lambda: self._score(gathered, Path(context.output)))

    def _score(self, records: list[dict[str, Any]], output: Path) -> dict[str, float]:
        if not records:
            raise ValueError("the evaluation split gave no questions; check the eval data and its split name")
        ids = [record["question_id"] for record in records]
        repeated = sorted({str(qid) for qid, n in Counter(ids).items() if n > 1})
        if repeated:
            raise ValueError(f"question ids {_examples(repeated)} were evaluated more than once; the evaluation "
                             "loader must read the split exactly once (mode='epoch')")
        annotated = [record for record in records if record["annotator_answers"] and record["majority"]]
        if self.answer_list is not None and annotated:
            self._check_answer_list([record["majority"] for record in annotated],
                                    [a for record in annotated for a in record["annotator_answers"]])
        predictions = {record["question_id"]: record["answer"] for record in records}
        path = write_vqa_results(output / RESULTS_FILE, predictions)
        if len(annotated) < len(records):
            unannotated = [str(r["question_id"]) for r in records if not (r["annotator_answers"] and r["majority"])]
            raise ValueError(
                f"{len(unannotated)} of {len(records)} evaluated questions have no annotator answers "
                f"(question ids {_examples(unannotated)}): the split cannot be scored here. The "
                f"predictions are in {path}; score a test split on the VQA evaluation server"
            )

        annotations = {record["question_id"]: record["annotator_answers"] for record in records}
        types = {record["question_id"]: record["answer_type"] for record in records}
        typed = all(isinstance(t, str) for t in types.values())
        score = vqa_accuracy(predictions, annotations, types if typed else None)
        constant = majority_answer(record["majority"] for record in records)
        baseline = vqa_accuracy(dict.fromkeys(annotations, constant), annotations)
        log.info("VQA accuracy %.2f over %d questions (answering %r everywhere: %.2f); results in %s",
                 score.overall, score.count, constant, baseline.overall, path)
        metrics: dict[str, float] = {"accuracy": score.overall, "baseline": baseline.overall, "count": score.count}
        metrics.update({f"accuracy/{kind}": value for kind, value in sorted(score.per_answer_type.items())})
        return metrics

    def _check_answer_list(self, majorities: list[str], annotator_answers: list[str]) -> None:
        """Rank mode can only predict listed answers: refuse a list that misses them all, warn when it misses some."""
        listed = {normalize_answer(answer) for answer in self.answer_list}
        annotated = Counter(normalize_answer(answer) for answer in annotator_answers)
        if not listed & annotated.keys():
            raise ValueError(
                f"answer list {self.settings.answer_list} ({len(self.answer_list)} answers, e.g. "
                f"{_examples(self.answer_list)}) contains none of the answers annotated in the evaluation "
                f"split, such as {_examples([a for a, _ in annotated.most_common()])}; ranking over it can "
                "never be right. It should list this dataset's candidate answers, e.g. the most frequent "
                "answers of its training annotations (ALBEF/mPLUG rank over the 3,128 most frequent VQA v2 answers)"
            )
        missing = Counter(m for m in map(normalize_answer, majorities) if m not in listed)
        if missing:
            share = sum(missing.values()) / len(majorities)
            log.warning(
                "answer list %s lacks the majority answer of %.1f%% of the %d evaluated questions (%s); "
                "ranking can never predict those", self.settings.answer_list, 100.0 * share, len(majorities),
                _examples([a for a, _ in missing.most_common()]),
            )
