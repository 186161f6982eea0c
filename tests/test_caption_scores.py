"""Caption metrics: the same numbers as pycocoevalcap's scorers run by hand, SPICE opt-in, clear errors.

Most tests run Java (the PTB tokenizer, METEOR); without it they are skipped with the install
command. Each METEOR run starts a JVM that loads a paraphrase table (about 10 s), so the scores
are computed once per module.
"""

from __future__ import annotations

import json
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from finetune.metrics.caption_scores import (
    SPICE_CORENLP_JARS,
    caption_scores,
    install_spice_jars,
    write_caption_results,
)

needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="needs a Java runtime for the PTB tokenizer and METEOR: apt-get install default-jre-headless (or make system-deps)",
)

# Five images, 2-5 references each, with the capitals and punctuation the PTB tokenizer removes.
REFERENCES = {
    101: [
        "A black cat sleeps on a red sofa.",
        "A cat is lying on the couch.",
        "A dark cat asleep on a sofa, curled up.",
    ],
    102: ["A man rides a horse along the beach.", "Someone riding a brown horse on the sand."],
    103: [
        "Two dogs play with a ball on the grass.",
        "A pair of dogs chasing a ball across a lawn.",
        "Dogs playing fetch in a park.",
        "Two puppies run after a tennis ball.",
    ],
    104: [
        "A plate of pasta on a wooden table.",
        "A bowl of spaghetti with tomato sauce.",
        "Noodles served on a plate next to a fork.",
        "A dish of pasta sitting on a table.",
        "Spaghetti and meatballs on a white plate.",
    ],
    105: ["A red double-decker bus drives down a city street.", "A bus on a busy road in London."],
}
PREDICTIONS = {
    101: "a black cat sleeps on the couch",
    102: "a man riding a horse on the beach",
    103: "two dogs playing with a ball",
    104: "a plate of pasta on a table",
    105: "a red bus on the street",
}
KEYS = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    return caption_scores(PREDICTIONS, REFERENCES)


@pytest.fixture(scope="module")
def pycocoevalcap_scores() -> dict[str, float]:
    """The COCOEvalCap pipeline, written out here with pycocoevalcap's classes."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in PREDICTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor  # its __del__ stops the JVM
    return {
        **{f"BLEU_{k}": bleu[k - 1] for k in range(1, 5)},
        "METEOR": meteor_score,
        "ROUGE_L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


@pytest.mark.slow
@needs_java
def test_scores_equal_pycocoevalcap_run_directly(scores, pycocoevalcap_scores):
    assert list(scores) == KEYS  # no SPICE unless asked for
    for key in KEYS:
        assert scores[key] == pytest.approx(pycocoevalcap_scores[key], abs=1e-9), key
        assert isinstance(scores[key], float)
    # fractions, not percent: BLEU, METEOR and ROUGE-L of this imperfect set lie in (0, 1) and
    # CIDEr, whose maximum is 10, in (0, 10)
    assert all(0 < scores[key] < 1 for key in KEYS if key != "CIDEr")
    assert 0 < scores["CIDEr"] < 10


@pytest.mark.slow
@needs_java
def test_a_prediction_equal_to_a_reference_scores_bleu_4_of_one_and_a_high_cider():
    perfect = {i: refs[0] for i, refs in REFERENCES.items()}
    result = caption_scores(perfect, REFERENCES)
    # Each prediction is its image's first reference: every n-gram is matched and the closest
    # reference length is its own, so BLEU-4 is 1 (up to pycocoevalcap's 1e-9 smoothing).
    assert result["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr averages 10 x (clipped, length-penalised cosine) over an image's m references; the
    # cosine with the identical reference is 1 (every order has some n-gram not in all five
    # images, so no norm is 0) and the others are >= 0, so each image scores >= 10 / m.
    bound = sum(10 / len(refs) for refs in REFERENCES.values()) / len(REFERENCES)  # about 3.57
    assert result["CIDEr"] >= bound


@pytest.mark.slow  # through the `scores` fixture
@needs_java
def test_line_breaks_inside_captions_do_not_shift_captions_between_images(scores, monkeypatch):
    # pycocoevalcap's tokenizer maps its output lines back to captions by position; a raw "\r"
    # would split a caption in two and move every later caption to the wrong image.
    # METEOR is stubbed out: it is not what is tested here, and it saves starting a JVM
    monkeypatch.setattr("finetune.metrics.caption_scores._meteor", lambda gts, res: 0.0)
    broken = {i: c.replace(" ", "\r", 1).replace(" ", "\u2028", 1) for i, c in PREDICTIONS.items()}
    result = caption_scores(broken, REFERENCES)
    for key in ("BLEU_4", "ROUGE_L", "CIDEr"):
        assert result[key] == pytest.approx(scores[key], abs=1e-12), key


@needs_java
def test_a_failed_meteor_process_raises_its_message_instead_of_hanging(monkeypatch):
    # Raw pycocoevalcap leaves Meteor's lock held after such a failure, and Meteor.__del__ then
    # blocks forever on it.
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.METEOR_JAR", "missing.jar")
    with pytest.raises(RuntimeError, match="METEOR's Java process failed: .*missing.jar"):
        caption_scores(PREDICTIONS, REFERENCES)


@needs_java
def test_spice_without_the_corenlp_jars_names_both_and_where_they_go(tmp_path):
    (tmp_path / SPICE_CORENLP_JARS[0]).write_bytes(b"")  # one of the two is not enough
    with pytest.raises(FileNotFoundError) as error:
        caption_scores(PREDICTIONS, REFERENCES, spice_jars=tmp_path)
    message = str(error.value)
    assert (
        "stanford-corenlp-3.6.0.jar" in message and "stanford-corenlp-3.6.0-models.jar" in message
    )
    assert "spice/lib" in message


def test_spice_jars_are_linked_into_the_lib_directory(tmp_path):
    jars, lib = tmp_path / "jars", tmp_path / "lib"
    jars.mkdir()
    lib.mkdir()
    for name in SPICE_CORENLP_JARS:
        (jars / name).write_bytes(name.encode())
    (lib / SPICE_CORENLP_JARS[1]).symlink_to(tmp_path / "stale.jar")  # a link left by an older run
    install_spice_jars(jars, lib)
    install_spice_jars(jars, lib)  # a second call finds them in place
    for name in SPICE_CORENLP_JARS:
        assert (lib / name).resolve() == (jars / name).resolve()
        assert (lib / name).read_bytes() == name.encode()


def test_without_java_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere
    with pytest.raises(
        RuntimeError,
        match="no `java` on PATH.*PTB tokenizer and METEOR.*apt-get install default-jre-headless",
    ):
        caption_scores(PREDICTIONS, REFERENCES)


@needs_java
def test_a_predicted_image_without_references_is_named():
    with pytest.raises(
        ValueError, match=r"1 predicted image ids have no references, e.g. \['101'\]"
    ):
        caption_scores({"101": "a cat"}, REFERENCES)


@needs_java
def test_an_empty_reference_list_is_rejected():
    with pytest.raises(ValueError, match="references for image 101 is empty"):
        caption_scores({101: "a cat"}, {101: []})


@needs_java
@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({101: None}, REFERENCES, "prediction for image 101 is a NoneType"),
        ({101: ["a cat"]}, REFERENCES, "prediction for image 101 is a list"),
        ({101: "a cat"}, {101: "a cat on a sofa"}, "references for image 101 is a single str"),
        ({101: "a cat"}, {101: ["a cat", 7]}, "a reference of image 101 is a int"),
    ],
)
def test_non_string_captions_are_rejected(predictions, references, message):
    with pytest.raises(TypeError, match=message):
        caption_scores(predictions, references)


def test_results_file_is_in_the_coco_results_format(tmp_path):
    path = write_caption_results(tmp_path / "results" / "test.json", PREDICTIONS)
    assert json.loads(path.read_text()) == [
        {"image_id": i, "caption": c} for i, c in PREDICTIONS.items()
    ]
