"""Questions with answers, and referring expressions, that a synthetic scene determines.

Everything is computed from the scene's shapes, so an answer or an expression is right by
construction. Questions ask for the colour of a kind, the kind of a colour, a count, whether an
object or colour is present, what sits leftmost or rightmost, and whether one shape is left of
another; yes/no questions are yes or no by a fair coin. Each carries ten annotators' answers, an
occasional one of them wrong, as VQA v2 records them. Each shape gets one to three expressions
that pick it out and no other shape of its image ("the red circle", "the circle on the left",
"the blue shape right of the red circle").

Shapes of a scene sit in distinct horizontal slots and are listed left to right, so "left of"
between two shapes is their order in `scene.shapes`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from data_prep.synthetic import COLOURS, POSITION_WORDS, SHAPES, Scene, Shape

ANNOTATORS = 10  # answers recorded per question, as in VQA v2
NOISY_QUESTION_RATE = 0.25  # share of questions where one or two annotators answer wrongly
QUESTIONS_PER_IMAGE = 5
MAX_EXPRESSIONS_PER_SHAPE = 3
NUMBER_ANSWERS = ("0", "1", "2", "3")  # digits, as VQA v2 answers and its evaluation normalise them
YES_NO = ("yes", "no")
ORDINALS = {2: ("leftmost", "rightmost"), 3: ("leftmost", "middle", "rightmost")}


@dataclass
class Question:
    text: str
    answer: str  # the most common of `answers`: VQA v2's multiple_choice_answer
    answer_type: str  # "yes/no", "number" or "other"
    question_type: str  # the opening words VQA v2 groups questions by ("what color is the")
    answers: list[str]  # the ten annotators' answers


@dataclass
class Referral:
    """Expressions that each name `scene.shapes[shape_index]` and no other shape of the scene."""

    shape_index: int
    sentences: list[str]


# A question generator returns (text, answer, answer_type, question_type), or None where the
# scene cannot answer it (a position question about a lone shape).
Draft = tuple[str, str, str, str]


def _colour_of_kind(shapes: list[Shape], rng: random.Random) -> Draft | None:
    unique = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    return f"What color is the {shape.kind}?", shape.colour, "other", "what color is the"


def _kind_of_colour(shapes: list[Shape], rng: random.Random) -> Draft:
    shape = rng.choice(shapes)
    return f"What shape is the {shape.colour} object?", shape.kind, "other", "what shape is the"


def _count_shapes(shapes: list[Shape], rng: random.Random) -> Draft:
    return "How many shapes are there?", NUMBER_ANSWERS[len(shapes)], "number", "how many"


def _count_kind(shapes: list[Shape], rng: random.Random) -> Draft:
    kind = rng.choice(SHAPES)
    count = sum(s.kind == kind for s in shapes)
    return f"How many {kind}s are there?", NUMBER_ANSWERS[count], "number", "how many"


def _object_exists(shapes: list[Shape], rng: random.Random) -> Draft:
    present = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
    else:
        absent = [(c, k) for c in sorted(COLOURS) for k in SHAPES if (c, k) not in present]
        # Half the absent objects share a colour or a kind with the scene, so that colour and
        # kind must be bound to the same shape to answer "no".
        near = [(c, k) for c, k in absent if any(c == s.colour or k == s.kind for s in shapes)]
        colour, kind = rng.choice(near if rng.random() < 0.5 else absent)
    answer = "yes" if (colour, kind) in present else "no"
    return f"Is there a {colour} {kind}?", answer, "yes/no", "is there a"


def _colour_exists(shapes: list[Shape], rng: random.Random) -> Draft:
    present = sorted(s.colour for s in shapes)
    if rng.random() < 0.5:
        colour = rng.choice(present)
    else:
        colour = rng.choice([c for c in sorted(COLOURS) if c not in present])
    answer = "yes" if colour in present else "no"
    return f"Is there a {colour} shape?", answer, "yes/no", "is there a"


def _positioned(shapes: list[Shape], rng: random.Random) -> tuple[str, Shape] | None:
    """A shape and how its position names it ("the leftmost shape"); None for a lone shape."""
    if len(shapes) < 2:
        return None
    index = rng.randrange(len(shapes))
    ordinal = ORDINALS[len(shapes)][index]
    phrase = "the shape in the middle" if ordinal == "middle" else f"the {ordinal} shape"
    return phrase, shapes[index]


def _colour_at_position(shapes: list[Shape], rng: random.Random) -> Draft | None:
    if (picked := _positioned(shapes, rng)) is None:
        return None
    phrase, shape = picked
    return f"What color is {phrase}?", shape.colour, "other", "what color is the"


def _kind_at_position(shapes: list[Shape], rng: random.Random) -> Draft | None:
    if (picked := _positioned(shapes, rng)) is None:
        return None
    phrase, shape = picked
    return f"What is {phrase}?", shape.kind, "other", "what is the"


def _relation(shapes: list[Shape], rng: random.Random) -> Draft | None:
    if len(shapes) < 2:
        return None
    first, second = rng.sample(range(len(shapes)), 2)
    true_side = "left of" if first < second else "right of"
    false_side = "right of" if first < second else "left of"
    side = true_side if rng.random() < 0.5 else false_side
    answer = "yes" if side == true_side else "no"
    text = f"Is the {shapes[first].name} {side} the {shapes[second].name}?"
    return text, answer, "yes/no", "is the"


GENERATORS: tuple[Callable[[list[Shape], random.Random], Draft | None], ...] = (
    _colour_of_kind, _kind_of_colour, _count_shapes, _count_kind, _object_exists,
    _colour_exists, _colour_at_position, _kind_at_position, _relation,
)


def _wrong_answers(answer: str, answer_type: str) -> list[str]:
    if answer_type == "yes/no":
        pool = YES_NO
    elif answer_type == "number":
        pool = NUMBER_ANSWERS
    else:
        pool = tuple(sorted(COLOURS)) if answer in COLOURS else SHAPES
    return [a for a in pool if a != answer]


def annotator_answers(answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """Ten answers, all `answer` except, for some questions, one or two plausible wrong ones."""
    answers = [answer] * ANNOTATORS
    if rng.random() < NOISY_QUESTION_RATE:
        wrong = _wrong_answers(answer, answer_type)
        for slot in rng.sample(range(ANNOTATORS), rng.randint(1, 2)):
            answers[slot] = rng.choice(wrong)
    return answers


def make_questions(scene: Scene, rng: random.Random, count: int = QUESTIONS_PER_IMAGE) -> list[Question]:
    """Up to `count` questions of different kinds about `scene`, each with its ten answers."""
    drafts = [draft for generate in GENERATORS if (draft := generate(scene.shapes, rng)) is not None]
    questions = []
    for text, answer, answer_type, question_type in rng.sample(drafts, min(count, len(drafts))):
        answers = annotator_answers(answer, answer_type, rng)
        questions.append(Question(text, answer, answer_type, question_type, answers))
    return questions


def answer_vocabulary() -> list[str]:
    """Every answer a synthetic question can have, sorted: the candidate list for ranking answers."""
    return sorted({*YES_NO, *NUMBER_ANSWERS, *COLOURS, *SHAPES})


def _expressions(shapes: list[Shape], index: int) -> list[str]:
    """Every expression of the grammar below that names `shapes[index]` and no other shape.

    the COLOUR KIND | the COLOUR shape | the NOUN [on the left|in the middle|on the right]
    | the NOUN (left of|right of) the COLOUR KIND, where NOUN is KIND or "shape".
    """
    target = shapes[index]
    found = [f"the {target.name}", f"the {target.colour} shape"]
    for noun in (target.kind, "shape"):
        group = [i for i, s in enumerate(shapes) if noun in ("shape", s.kind)]
        if len(group) == 1:
            found.append(f"the {noun}")
        else:
            found.append(f"the {noun} {POSITION_WORDS[len(group)][group.index(index)]}")
    for anchor_index, anchor in enumerate(shapes):
        if anchor_index == index:
            continue
        right = index > anchor_index
        side = "right of" if right else "left of"
        beside = [i for i in range(len(shapes)) if (i > anchor_index) == right and i != anchor_index]
        for noun in (target.kind, "shape"):
            if [i for i in beside if noun in ("shape", shapes[i].kind)] == [index]:
                found.append(f"the {noun} {side} the {anchor.name}")
        found.append(f"the {target.colour} shape {side} the {anchor.name}")
    return list(dict.fromkeys(found))


def make_referrals(scene: Scene, rng: random.Random) -> list[Referral]:
    """One referral per shape, left to right, with one to three unambiguous expressions each."""
    referrals = []
    for index in range(len(scene.shapes)):
        candidates = _expressions(scene.shapes, index)
        count = rng.randint(1, min(MAX_EXPRESSIONS_PER_SHAPE, len(candidates)))
        referrals.append(Referral(index, rng.sample(candidates, count)))
    return referrals
