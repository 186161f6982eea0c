"""VQA v2 (questions + annotations) and Visual Genome QA -> VQA shards.

Inputs, as released:

- `v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json`:
  {"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}], ...}
  (`test-dev2015` is read too: its split is `test_dev`, its images sit in `test2015`).
- `v2_mscoco_{train,val}2014_annotations.json`: {"data_subtype": "train2014", "annotations":
  [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}. Every questions file of a
  train or val subtype needs the annotations file of its subtype; test questions have none.
- Visual Genome `question_answers.json`: [{"id": image_id, "qas": [{"qa_id", "image_id",
  "question", "answer"}]}]. Its samples join the `train` split with `source: "vg"`; VG answers
  ("Green.") are lower-cased and lose one trailing full stop, the form VQA answers have.

Images: `ROOT/{subtype}/COCO_{subtype}_{image_id:012d}.jpg` for VQA (`image_pattern`), and
`ROOT/{image_id}.jpg` for VG (`vg_image_pattern`); every media root is searched in turn.

One sample per question, key `QUESTIONID` (`vg_QAID` for VG), txt = the question. Task fields
in KEY.json: question_id, image_id, question, answers (the unique answers, most frequent
first), weights (for each unique answer its count / number of answers: the loss weighting by
annotator agreement, [yes x7, no x3] -> [0.7, 0.3]), annotator_answers (every annotator's answer
as recorded: what the official accuracy counts), answer_type, question_type (None where the
source has none), source ("vqa" or "vg"). splits.json lists question ids, `vg_QAID` for VG.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.convert.common import Conversion, read_json, top_list
from data_prep.convert.report import (
    UNMATCHED,
    ConvertReport,
    InputError,
    RecordProblem,
    label,
    need,
)
from data_prep.shard_writer import Sample

SUBTYPES = {  # data_subtype -> (output split, image folder subtype)
    "train2014": ("train", "train2014"),
    "val2014": ("val", "val2014"),
    "test2015": ("test", "test2015"),
    "test-dev2015": ("test_dev", "test2015"),
}
DEFAULT_IMAGE_PATTERN = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
DEFAULT_VG_IMAGE_PATTERN = "{image_id}.jpg"
QUESTIONS_EXPECTED = 'VQA v2 questions {"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}]}'
ANNOTATIONS_EXPECTED = 'VQA v2 annotations {"data_subtype": "train2014", "annotations": [{"question_id", "answers": [...]}]}'
VG_EXPECTED = 'Visual Genome question_answers.json [{"id": image_id, "qas": [{"qa_id", "image_id", "question", "answer"}]}]'


def convert_vqa_v2(
    questions: Sequence[str | Path],
    output: str | Path,
    image_root: Any,
    *,
    annotations: Sequence[str | Path] = (),
    vg_qa: str | Path | None = None,
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    vg_image_pattern: str = DEFAULT_VG_IMAGE_PATTERN,
    **settings: Any,
) -> ConvertReport:
    """Convert VQA v2 questions files (with their annotations) and optionally VG QA.

    `settings` go to `Conversion`: strict, shard_size, limit, max_problems.
    """
    _check_pattern("image_pattern", image_pattern, subtype="train2014", image_id=1)
    _check_pattern("vg_image_pattern", vg_image_pattern, image_id=1)
    with Conversion("vqa_v2", "vqa", output, image_root, **settings) as run:
        index, covered = _annotation_index(run, [Path(p) for p in annotations])
        for path in map(Path, questions):
            _convert_questions(run, path, index, covered, image_pattern)
        if vg_qa is not None:
            _convert_vg(run, Path(vg_qa), vg_image_pattern)
        return run.finish()


def weighted_answers(answers: list[str]) -> tuple[list[str], list[float]]:
    """Unique answers, most frequent first, each with its share of all answers."""
    counts = Counter(answers)
    unique = [answer for answer, _ in counts.most_common()]
    return unique, [counts[answer] / len(answers) for answer in unique]


def _check_pattern(name: str, pattern: str, **fields: Any) -> None:
    try:
        pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        names = ", ".join("{" + key + "}" for key in fields)
        raise InputError(f"{name} {pattern!r} cannot be formatted ({error!r}); it may use {names}") from None


def _annotation_index(run: Conversion, paths: list[Path]) -> tuple[dict[int, dict], dict[str, str]]:
    """question_id -> annotation record, and data_subtype -> the file that annotates it."""
    index: dict[int, dict] = {}
    covered: dict[str, str] = {}
    for path in paths:
        payload = read_json(path, ANNOTATIONS_EXPECTED)
        records = top_list(payload, "annotations", path, ANNOTATIONS_EXPECTED)
        subtype = payload.get("data_subtype")
        if not isinstance(subtype, str):
            raise InputError(f"{path} has no 'data_subtype' string; expected {ANNOTATIONS_EXPECTED}")
        covered[subtype] = path.name
        for position, record in enumerate(records):
            with run.record(path.name, label("annotations", position, record, "question_id")):
                index[need(record, "question_id", int)] = record
    return index, covered


def _convert_questions(
    run: Conversion, path: Path, index: dict[int, dict], covered: dict[str, str], image_pattern: str
) -> None:
    payload = read_json(path, QUESTIONS_EXPECTED)
    records = top_list(payload, "questions", path, QUESTIONS_EXPECTED)
    subtype = payload.get("data_subtype")
    if subtype not in SUBTYPES:
        raise InputError(f"{path}: data_subtype {subtype!r} is not one of {sorted(SUBTYPES)}")
    split, image_subtype = SUBTYPES[subtype]
    annotated = not subtype.startswith("test")
    if annotated and subtype not in covered:
        raise InputError(
            f"{path} holds {subtype} questions but no annotations file covers {subtype}; "
            f"give v2_mscoco_{subtype}_annotations.json as annotations"
        )
    for position, record in enumerate(records):
        with run.record(path.name, label("questions", position, record, "question_id")):
            if run.full(split):
                continue
            question_id = need(record, "question_id", int)
            image_id = need(record, "image_id", int)
            question = need(record, "question", str).strip()
            meta = {"question_id": question_id, "image_id": image_id, "question": question,
                    "answers": [], "weights": [], "answer_type": None, "question_type": None, "source": "vqa"}
            if annotated:
                meta.update(_annotation_fields(index, covered[subtype], question_id, image_id))
            image = run.image(image_pattern.format(subtype=image_subtype, image_id=image_id))
            run.write(split, [Sample(str(question_id), *image, question, meta)], question_id)


def _annotation_fields(index: dict[int, dict], file: str, question_id: int, image_id: int) -> dict[str, Any]:
    annotation = index.get(question_id)
    if annotation is None:
        raise RecordProblem(f"no annotation with question_id {question_id} in {file}", UNMATCHED)
    try:
        if need(annotation, "image_id", int) != image_id:
            raise RecordProblem(f"image_id is {annotation['image_id']} there but {image_id} in the question")
        texts = []
        for position, answer in enumerate(need(annotation, "answers", list, non_empty=True)):
            try:
                texts.append(need(answer, "answer", str).strip())
            except RecordProblem as problem:
                raise RecordProblem(f"answers[{position}]: {problem.message}") from None
        answers, weights = weighted_answers(texts)
        return {"answers": answers, "weights": weights, "annotator_answers": texts,
                "answer_type": need(annotation, "answer_type", str),
                "question_type": need(annotation, "question_type", str)}
    except RecordProblem as problem:
        raise RecordProblem(f"its annotation in {file}: {problem.message}", problem.reason) from None


def _convert_vg(run: Conversion, path: Path, image_pattern: str) -> None:
    entries = top_list(read_json(path, VG_EXPECTED), None, path, VG_EXPECTED)
    for position, entry in enumerate(entries):
        where = label("", position, entry, "id")
        qas: list[Any] = []
        with run.record(path.name, where):
            qas = need(entry, "qas", list)
        for qa_position, qa in enumerate(qas):
            with run.record(path.name, label(f"[{position}].qas", qa_position, qa, "qa_id")):
                if run.full("train"):
                    continue
                qa_id = need(qa, "qa_id", int)
                image_id = need(qa, "image_id", int)
                question = need(qa, "question", str).strip()
                answer = need(qa, "answer", str).strip().lower().removesuffix(".").strip()
                if not answer:
                    raise RecordProblem("'answer' is blank")
                meta = {"question_id": qa_id, "image_id": image_id, "question": question,
                        "answers": [answer], "weights": [1.0], "answer_type": None, "question_type": None,
                        "source": "vg"}
                image = run.image(image_pattern.format(image_id=image_id))
                run.write("train", [Sample(f"vg_{qa_id}", *image, question, meta)], f"vg_{qa_id}")
