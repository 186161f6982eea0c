"""Video question answering (MSRVTT-QA, MSVD-QA): the VQA task on clips, scored by exact match.

    clip (B, T, 3, S, S) --video encoder + universal layers--> v (B, 1 + T*N, D)
    question --text_encoder--> l --fusion(l, v)--> [v ; l] --decoder--> [CLS] answer [SEP]

mPLUG-2's composition for video QA is the image VQA path with the video encoder in front
(`MPLUG.encode_image` takes clips), so training (the weighted answer loss) and both inference
modes are VQATask's: beam search (`inference: generate`) or ranking a closed answer list
(`inference: rank`). MSRVTT-QA and MSVD-QA are ranked over the answers of their train split:
`answer_list: train` builds that list in `prepare_data` (the `answer_list_size` most frequent
majority answers of DATA/<train_split>, ties in alphabetical order) and ships it in the model
package as ANSWER_LIST_FILE, so `mplug predict` ranks over the same answers.

Scoring is exact match, the metric these benchmarks report: a question is right when the
prediction equals its ground-truth answer (meta["answers"][0], the majority answer; the only
answer in MSRVTT-QA and MSVD-QA) after the VQA answer normalisation. The VQA accuracy would not
do: its leave-one-annotator-out average gives a question with a single annotated answer 0 even
when the prediction matches it. `baseline` is the exact match of answering every question with
the split's most frequent majority answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import torch

from data_prep.shard_source import resolve_shards
from finetune.metrics.vqa_accuracy import normalize_answer, write_vqa_results
from finetune.tasks.vqa import RESULTS_FILE, VQASettings, VQATask, _examples, majority_answer
from pretrain.models.mplug import MPLUG

log = logging.getLogger(__name__)

TRAIN_ANSWERS = "train"  # task.answer_list: rank over the train split's answers
ANSWER_LIST_FILE = "answer_list.json"  # in the model package, when the list came from the train split
PERCENT = 100.0


@dataclass
class VideoQASettings(VQASettings):
    """VQASettings for clips; `answer_list` may also be "train" (the train split's answers)."""

    inference: str = "rank"  # MSRVTT-QA / MSVD-QA rank over the train split's answer vocabulary
    answer_list: str | None = TRAIN_ANSWERS
    answer_list_size: int = 1000  # answers kept by `answer_list: train`, the most frequent first; 0 keeps all

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.answer_list_size < 0:
            raise ValueError(f"task.answer_list_size must be >= 0 (0 keeps every answer), got {self.answer_list_size}")


def split_answers(split: str | Path, size: int) -> list[str]:
    """The `size` (0: all) most frequent majority answers (KEY.json answers[0]) of a split, ties alphabetical."""
    counts: Counter[str] = Counter()
    for shard in resolve_shards(str(split)):
        for meta in shard_metadata(shard.url):
            if meta.get("answers"):
                counts[normalize_answer(str(meta["answers"][0]))] += 1
    if not counts:
        raise ValueError(f"no sample of {split} has `answers` in its KEY.json, so no answer list can be built from "
                         "it; convert the QA data with its answers, or give task.answer_list a JSON file")
    ranked = sorted(counts, key=lambda answer: (-counts[answer], answer))
    return ranked[:size] if size else ranked


def shard_metadata(url: str) -> Iterator[dict[str, Any]]:
    """Every KEY.json of a tar shard. The tar is read with seeks over the other members, so the
    videos (every question of a clip carries it) are not read; a damaged shard is logged and ends early."""
    try:
        with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    yield json.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, json.JSONDecodeError) as error:
        log.warning("shard %s unreadable, the rest of its answers left out of the answer list: %s", url, error)


class VideoQATask(VQATask):
    name: ClassVar[str] = "video_qa"
    metric: ClassVar[str] = "accuracy"
    Settings: ClassVar[type] = VideoQASettings
    video: ClassVar[bool] = True

    def __init__(self, model: MPLUG, settings: VideoQASettings | None, tokenizer):
        settings = settings if settings is not None else VideoQASettings()
        from_train = settings.inference == "rank" and settings.answer_list == TRAIN_ANSWERS
        # VQATask loads a rank-mode answer list from its file; one from the train split comes later
        # (prepare_data or load_package_files), so the parent is built without it.
        super().__init__(model, dataclasses.replace(settings, inference="generate") if from_train else settings,
                         tokenizer)
        self.settings = settings
        self.answers_from_train = from_train

    def set_answer_list(self, answers: list[str]) -> None:
        """Rank over `answers` (tokenised once here)."""
        if not answers:
            raise ValueError("the answer list is empty; ranking needs at least one candidate answer")
        encoded = self._tokenize_answers(answers)
        self.answer_list = list(answers)
        self.answer_ids, self.answer_mask = encoded["input_ids"], encoded["attention_mask"]

    def prepare_data(self, data: Path, train_split: str) -> None:
        if self.answers_from_train:
            answers = split_answers(Path(data) / train_split, self.settings.answer_list_size)
            log.info("video QA ranks over the %d most frequent answers of %s (e.g. %s)", len(answers),
                     Path(data) / train_split, ", ".join(answers[:5]))
            self.set_answer_list(answers)

    def package_files(self, state) -> dict[str, bytes]:
        files = super().package_files(state)
        if self.answers_from_train and self.answer_list is not None:
            files[ANSWER_LIST_FILE] = json.dumps(self.answer_list).encode()
        return files

    def load_package_files(self, directory: Path) -> None:
        super().load_package_files(directory)
        if self.answers_from_train:
            path = Path(directory) / ANSWER_LIST_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{directory} holds no {ANSWER_LIST_FILE}, the train-split answers this "
                                        "video_qa model ranks over; re-export the package from its fine-tuning run")
            self.set_answer_list(json.loads(path.read_text()))

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[str]:
        if self.settings.inference == "rank" and self.answer_list is None:
            raise ValueError("task.answer_list is 'train' but no answer list was built: call prepare_data(DATA, "
                             "train_split) first (the fine-tuning trainer does), or give a JSON answer list file")
        return super().answer(batch)

    def _score(self, records: list[dict[str, Any]], output: Path) -> dict[str, float]:
        if not records:
            raise ValueError("the evaluation split gave no questions; check the eval data and its split name")
        repeated = sorted({str(qid) for qid, n in Counter(r["question_id"] for r in records).items() if n > 1})
        if repeated:
            raise ValueError(f"question ids {_examples(repeated)} were evaluated more than once; the evaluation "
                             "loader must read the split exactly once (mode='epoch')")
        path = write_vqa_results(output / RESULTS_FILE, {r["question_id"]: r["answer"] for r in records})
        unanswered = [str(r["question_id"]) for r in records if not r["majority"]]
        if unanswered:
            raise ValueError(f"{len(unanswered)} of {len(records)} evaluated questions have no answer (meta['answers'] "
                             f"is empty for question ids {_examples(unanswered)}); the predictions are in {path}")
        majorities = [r["majority"] for r in records]
        if self.answer_list is not None:
            self._check_answer_list(majorities, majorities)
        truth = {r["question_id"]: normalize_answer(r["majority"]) for r in records}
        predictions = {r["question_id"]: normalize_answer(r["answer"]) for r in records}
        constant = normalize_answer(majority_answer(majorities))
        metrics = {"accuracy": exact_match(predictions, truth),
                   "baseline": exact_match(dict.fromkeys(truth, constant), truth), "count": float(len(truth))}
        types = {r["question_id"]: r["answer_type"] for r in records}
        if all(isinstance(kind, str) for kind in types.values()):
            for kind in sorted(set(types.values())):
                ids = [qid for qid, t in types.items() if t == kind]
                metrics[f"accuracy/{kind}"] = exact_match(predictions, {qid: truth[qid] for qid in ids})
        log.info("video QA exact match %.2f over %d questions (answering %r everywhere: %.2f); results in %s",
                 metrics["accuracy"], len(truth), constant, metrics["baseline"], path)
        return metrics


def exact_match(predictions: dict[Any, str], truth: dict[Any, str]) -> float:
    """Percent of the questions of `truth` whose normalised prediction equals their normalised answer."""
    return PERCENT * sum(predictions[qid] == answer for qid, answer in truth.items()) / len(truth)
