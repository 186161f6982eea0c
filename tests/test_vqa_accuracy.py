"""VQA v2 accuracy: the official answer normalisation, the 10-choose-9 score, the results file."""

from __future__ import annotations

import json

import pytest

from finetune.metrics.vqa_accuracy import (
    VQAScore,
    answer_accuracy,
    normalize_answer,
    vqa_accuracy,
    write_vqa_results,
)


def ten_answers(matching: int, answer: str = "yes", other: str = "no") -> list[str]:
    """Ten human answers of which `matching` are `answer`."""
    return [answer] * matching + [other] * (10 - matching)


# --- normalisation ------------------------------------------------------------------------------


def test_number_words_become_digits_after_lowercasing():
    assert normalize_answer("Two") == "2"  # "two" in the number table
    assert normalize_answer("none") == "0"  # "none" counts as zero


def test_articles_and_trailing_period_are_removed():
    # "." not followed by a digit is dropped -> "the dog" -> article "the" dropped
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("a red car") == "red car"


def test_decimal_point_is_kept():
    assert normalize_answer("3.5") == "3.5"  # the period is followed by a digit


def test_missing_apostrophe_is_restored_from_the_contraction_table():
    assert normalize_answer("isnt") == "isn't"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("Whats") == "what's"  # lowercased first, then looked up


def test_apostrophe_is_not_punctuation():
    # "'" is not in the official punctuation list, so a written contraction stays as it is
    assert normalize_answer("isn't") == "isn't"


def test_thousands_comma_is_removed_not_spaced():
    # "1,000" matches (\d)(,)(\d), so every punctuation mark is deleted rather than spaced
    assert normalize_answer("1,000") == "1000"


def test_a_number_comma_deletes_all_punctuation_in_the_answer():
    # the comma rule is per answer: "(approx)" loses its brackets without leaving spaces
    assert normalize_answer("1,000 (approx)") == "1000 approx"


def test_exclamation_mark_at_the_end_is_dropped():
    # "!" is replaced by a space ("yes "), and splitting on whitespace drops it
    assert normalize_answer("yes!") == "yes"


def test_punctuation_between_words_becomes_a_space():
    assert normalize_answer("black/white") == "black white"  # no space next to "/": spaced
    assert normalize_answer("black / white") == "black white"  # space next to "/": deleted


def test_newlines_tabs_and_case_are_normalised():
    assert normalize_answer("  Yes\n") == "yes"
    assert normalize_answer("red\tcar") == "red car"


# --- per-question accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # k of 10 humans match. Leaving out a matching answer leaves k-1 matches, leaving out
        # any of the 10-k others leaves k; each subset scores min(matches/3, 1).
        (0, 0.0),
        (1, 0.3),  # (1*min(0/3,1) + 9*min(1/3,1)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10: every subset still has 3 matches
        (10, 1.0),
    ],
)
def test_accuracy_with_k_of_ten_humans_agreeing(matching, expected):
    assert answer_accuracy("yes", ten_answers(matching)) == pytest.approx(expected)


def test_the_prediction_is_fully_normalised_against_recorded_answers():
    # "Two." -> "2"; the recorded answers are digits already, as VQA v2 stores them: 3 match -> 0.9
    assert answer_accuracy("Two.", ten_answers(3, "2", "3")) == pytest.approx(0.9)


def test_disagreeing_human_answers_get_only_the_punctuation_step_as_in_the_official_script():
    # "black/white" -> "black white" by the punctuation step (the annotators disagree): 3 match -> 0.9;
    # "two" is not turned into "2" on the human side, so a prediction "two" ("2") matches none
    assert answer_accuracy("black white", ten_answers(3, "black/white", "red")) == pytest.approx(0.9)
    assert answer_accuracy("two", ten_answers(3, "two", "three")) == 0.0


def test_unanimous_human_answers_are_compared_as_recorded():
    # all ten say "Yes": no normalisation on their side, and the prediction "yes" matches none
    assert answer_accuracy("yes", ["Yes"] * 10) == 0.0


def test_fewer_than_ten_answers_use_the_same_leave_one_out_formula():
    # 3 answers, all matching: each left-out subset has 2 matches -> 2/3
    assert answer_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # 1 answer, matching: leaving it out leaves none -> 0
    assert answer_accuracy("yes", ["yes"]) == 0.0


def test_no_answers_is_an_error_naming_the_question():
    with pytest.raises(ValueError, match="question 42 has no ground-truth answers"):
        answer_accuracy("yes", [], question_id=42)


def test_a_single_string_of_answers_is_rejected():
    with pytest.raises(TypeError, match="single string"):
        answer_accuracy("yes", "yes")


def test_a_non_string_prediction_is_an_error_naming_the_question():
    with pytest.raises(TypeError, match="question 5: the prediction is int 2"):
        answer_accuracy(2, ["2"], question_id=5)


# --- dataset accuracy ---------------------------------------------------------------------------


def test_overall_accuracy_is_the_mean_over_questions_in_percent():
    annotations = {1: ten_answers(10), 2: ten_answers(1), 3: ten_answers(2)}
    predictions = {1: "yes", 2: "yes", 3: "yes"}
    score = vqa_accuracy(predictions, annotations)
    # (1.0 + 0.3 + 0.6) / 3 = 0.6333... -> 63.33%
    assert score.overall == pytest.approx(100 * 1.9 / 3)
    assert score.count == 3
    assert score.missing == []


def test_missing_predictions_score_zero_and_are_listed():
    annotations = {1: ten_answers(10), 2: ten_answers(10)}
    score = vqa_accuracy({1: "yes"}, annotations)
    assert score == VQAScore(overall=50.0, count=2, per_answer_type={}, missing=[2])


def test_predictions_for_unknown_questions_are_an_error_naming_them():
    with pytest.raises(ValueError, match=r"2 predictions .* 7, 8"):
        vqa_accuracy({1: "yes", 7: "no", 8: "no"}, {1: ten_answers(10)})


def test_string_ids_do_not_match_integer_ids():
    with pytest.raises(ValueError, match="int vs str"):
        vqa_accuracy({"1": "yes"}, {1: ten_answers(10)})


def test_accuracy_per_answer_type():
    annotations = {1: ten_answers(10), 2: ten_answers(0), 3: ten_answers(3, "2", "3")}
    predictions = {1: "yes", 2: "yes", 3: "two"}
    types = {1: "yes/no", 2: "yes/no", 3: "number"}
    score = vqa_accuracy(predictions, annotations, types)
    # yes/no: (1.0 + 0.0) / 2 = 50%; number: "two" -> "2", 3 humans -> 90%
    assert score.per_answer_type == pytest.approx({"yes/no": 50.0, "number": 90.0})
    assert score.overall == pytest.approx(100 * 1.9 / 3)


def test_answer_types_must_cover_every_question():
    with pytest.raises(ValueError, match="no type for 1 annotated questions: 2"):
        vqa_accuracy({}, {1: ["yes"], 2: ["no"]}, {1: "yes/no"})


def test_empty_annotations_are_an_error():
    with pytest.raises(ValueError, match="no questions to evaluate"):
        vqa_accuracy({}, {})


# --- results file -------------------------------------------------------------------------------


def test_results_file_is_the_challenge_format_sorted_by_question_id(tmp_path):
    path = write_vqa_results(tmp_path / "sub" / "vqa_result.json", {20: "no", 3: "2", "7": "red"})
    assert json.loads(path.read_text()) == [
        {"question_id": 3, "answer": "2"},
        {"question_id": 7, "answer": "red"},
        {"question_id": 20, "answer": "no"},
    ]


def test_results_file_rejects_non_integer_question_ids(tmp_path):
    with pytest.raises(ValueError, match="'q1' .* not an integer"):
        write_vqa_results(tmp_path / "r.json", {"q1": "yes"})


def test_results_file_rejects_an_id_given_twice(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        write_vqa_results(tmp_path / "r.json", {1: "yes", "1": "no"})
