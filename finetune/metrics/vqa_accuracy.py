"""VQA v2 accuracy as the official evaluation computes it, and the challenge's result file.

An answer is normalised the way the official VQA evaluation (vqaEval.py, GT-Vision-Lab/VQA, the
version the VQA challenge and ALBEF/mPLUG use) normalises it: punctuation, then digits, articles
and contractions. A prediction scores min(#matching humans / 3, 1), averaged over the ten
leave-one-annotator-out subsets of the ten human answers.

The ground truth is treated exactly as the official script treats it: whitespace-trimmed, and
run through the punctuation step only when the annotators disagree (the released annotations
were normalised when collected). The prediction always goes through the whole normalisation.
"""

from __future__ import annotations

import json
import numbers
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Characters the official punctuation step removes or turns into a space.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)  # fmt: skip
# A comma between digits ("1,000"): if the answer has one, punctuation is removed, not spaced.
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit is dropped, so "3.5" keeps its decimal point. The official
# pattern begins with "(?!<=\d)", a misspelt look-behind that is really a look-ahead for "<="
# and a digit; it never stops a match, and is kept so that the regex is the official one.
PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE (= 32) as re.sub's `count`: at most 32 periods are
# dropped per answer. Kept for exactness; no real answer has that many.
OFFICIAL_PERIOD_COUNT = int(re.UNICODE)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# The official table, entry for entry (its keys with capitals can never match lowercased text,
# and "somebody'd" -> "somebodyd" is reversed; both are kept because they are the official data).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

HUMANS_FOR_FULL_CREDIT = 3  # an answer given by 3 of the other annotators scores 1
MAX_IDS_IN_ERROR = 5

QuestionId = Hashable


def _process_punctuation(text: str) -> str:
    # The choice between removing and spacing is made on the input text, for each character in
    # turn, while the replacements accumulate on the output: as in the official script.
    has_number_comma = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")  # "black/white" -> "black white"
    return PERIOD_NOT_DECIMAL.sub("", out, count=OFFICIAL_PERIOD_COUNT)


def _process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _trimmed(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of a prediction: "The Dog." -> "dog", "Two" -> "2", "isnt" -> "isn't"."""
    return _process_digits_articles(_process_punctuation(_trimmed(text)))


def answer_accuracy(
    prediction: str, gt_answers: Sequence[str], question_id: QuestionId | None = None
) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of one question.

    For each human answer, leave it out and count the other answers equal to the prediction:
    min(count / 3, 1); the mean over the left-out answers. With ten answers of which k match the
    prediction this is 0, 0.3, 0.6, 0.9, 1 for k = 0..4+. Fewer than ten answers use the same
    formula over the ones given. `question_id` only names the question in errors.
    """
    if not isinstance(prediction, str):
        raise TypeError(
            f"question {question_id!r}: the prediction is {type(prediction).__name__} "
            f"{prediction!r}; expected the answer string"
        )
    if isinstance(gt_answers, str):
        raise TypeError(
            f"question {question_id!r}: gt_answers must be a sequence of answer strings, got the "
            f"single string {gt_answers!r}; wrap it in a list"
        )
    if len(gt_answers) == 0:
        raise ValueError(
            f"question {question_id!r} has no ground-truth answers; VQA accuracy needs at least "
            "one (VQA v2 has 10 per question)"
        )
    pred = normalize_answer(prediction)
    humans = [_trimmed(a) for a in gt_answers]
    if len(set(humans)) > 1:  # the official script normalises disagreeing answers' punctuation only
        humans = [_process_punctuation(a) for a in humans]
    matches = [a == pred for a in humans]
    total_matches = sum(matches)
    # Leaving answer i out removes one match exactly when answer i itself matched.
    scores = [min((total_matches - left_out) / HUMANS_FOR_FULL_CREDIT, 1.0) for left_out in matches]
    return sum(scores) / len(scores)


@dataclass
class VQAScore:
    overall: float  # percent, over every annotated question (missing predictions score 0)
    count: int  # questions evaluated: all of the annotations
    per_answer_type: dict[str, float] = field(default_factory=dict)  # percent, if types given
    missing: list[QuestionId] = field(default_factory=list)  # annotated but not predicted


def _some_ids(ids: Sequence[QuestionId]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_IDS_IN_ERROR])
    more = f" and {len(ids) - MAX_IDS_IN_ERROR} more" if len(ids) > MAX_IDS_IN_ERROR else ""
    return shown + more


def vqa_accuracy(
    predictions: Mapping[QuestionId, str],
    annotations: Mapping[QuestionId, Sequence[str]],
    answer_types: Mapping[QuestionId, str] | None = None,
) -> VQAScore:
    """VQA accuracy over every question of `annotations` (question id -> human answers).

    A question without a prediction scores 0 and is listed in `missing`, so a partial run cannot
    report a higher number than a full one. `answer_types` (question id -> "yes/no", "number",
    "other") adds the per-type breakdown of the official evaluation. Percentages are not rounded
    (the official script rounds to 2 decimals).
    """
    if not annotations:
        raise ValueError("annotations is empty: there are no questions to evaluate")
    unknown = [qid for qid in predictions if qid not in annotations]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions are for question ids not in the annotations: "
            f"{_some_ids(unknown)}; predictions must be keyed by the annotations' question ids "
            "(check the split and the id type, int vs str)"
        )
    if answer_types is not None:
        untyped = [qid for qid in annotations if qid not in answer_types]
        if untyped:
            raise ValueError(
                f"answer_types has no type for {len(untyped)} annotated questions: "
                f"{_some_ids(untyped)}; give a type for every question or pass answer_types=None"
            )

    missing: list[QuestionId] = []
    scores: dict[QuestionId, float] = {}
    for qid, gt_answers in annotations.items():
        if qid in predictions:
            scores[qid] = answer_accuracy(predictions[qid], gt_answers, question_id=qid)
        else:
            missing.append(qid)
            scores[qid] = 0.0

    per_type: dict[str, float] = {}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for qid, score in scores.items():
            by_type.setdefault(answer_types[qid], []).append(score)
        per_type = {t: 100.0 * sum(s) / len(s) for t, s in by_type.items()}

    return VQAScore(
        overall=100.0 * sum(scores.values()) / len(scores),
        count=len(scores),
        per_answer_type=per_type,
        missing=missing,
    )


def write_vqa_results(path: str | Path, predictions: Mapping[QuestionId, str]) -> Path:
    """Write the challenge's result file: [{"question_id": int, "answer": str}, ...] by id."""
    rows = []
    for qid, answer in predictions.items():
        if isinstance(qid, numbers.Integral) and not isinstance(qid, bool):
            int_id = int(qid)
        elif isinstance(qid, str) and qid.isascii() and qid.isdigit():
            int_id = int(qid)
        else:
            raise ValueError(
                f"question id {qid!r} ({type(qid).__name__}) is not an integer; the VQA challenge "
                "format needs integer question ids"
            )
        if not isinstance(answer, str):
            raise TypeError(
                f"answer for question {qid!r} is {type(answer).__name__} {answer!r}; expected str"
            )
        rows.append({"question_id": int_id, "answer": answer})
    ids = [r["question_id"] for r in rows]
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(
            f"question ids {_some_ids(repeated)} occur more than once when written as integers "
            "(e.g. both 1 and '1'); give each question one prediction"
        )
    rows.sort(key=lambda r: r["question_id"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path
