"""The synthetic data set: deterministic files in the official formats, every answer, box and
expression true of the drawn scene.

Answers and expressions are checked against the shapes by a reader written here, not by the code
that wrote them; scene n of a data set is scene n of `make_scenes(N, seed, image_size)`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from data_prep.synthetic import COLOURS, SHAPES, Shape, make_scenes, vocabulary_texts
from data_prep.synthetic_export import write_synthetic, write_url_list

NUM_SAMPLES, SEED, SIZE = 200, 7, 128
COLOUR_TOLERANCE = 40  # per channel, for JPEG's error on flat colours
BOX_TOLERANCE = 2.5  # pixels between a written box and the box of the drawn colour
APEX_TOLERANCE = 4.5  # a triangle's apex is a pixel wide for a few rows, and JPEG fades it


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), NUM_SAMPLES, seed=SEED, image_size=SIZE)


@pytest.fixture(scope="module")
def shapes_by_image():
    return {i + 1: scene.shapes for i, scene in enumerate(make_scenes(NUM_SAMPLES, SEED, SIZE))}


def load_json(path: Path):
    return json.loads(path.read_text())


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def vqa_pairs(dataset):
    for subset in ("train2014", "val2014"):
        questions = load_json(dataset.vqa_questions(subset))["questions"]
        annotations = load_json(dataset.vqa_annotations(subset))["annotations"]
        yield from zip(questions, annotations, strict=True)


def left_to_right(shapes: list[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: s.centre[0])


def ordinal(shapes: list[Shape], word: str) -> Shape:
    ordered = left_to_right(shapes)
    if word == "middle":
        assert len(ordered) == 3, f"'middle' of {len(ordered)} shapes"
        return ordered[1]
    return ordered[0] if word in ("leftmost", "left") else ordered[-1]


def the_one(shapes: list[Shape], colour: str | None = None, kind: str | None = None) -> Shape:
    found = [s for s in shapes if colour in (None, s.colour) and kind in (None, "shape", s.kind)]
    assert len(found) == 1, f"{colour} {kind} names {len(found)} shapes"
    return found[0]


def answer_of(question: str, shapes: list[Shape]) -> str:
    """The answer a reader of the image gives, from the shapes alone."""
    q = question.lower()
    if m := re.fullmatch(r"what color is the (circle|square|triangle)\?", q):
        return the_one(shapes, kind=m[1]).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        return the_one(shapes, colour=m[1]).kind
    if q == "how many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(r"how many (circle|square|triangle)s are there\?", q):
        return str(sum(s.kind == m[1] for s in shapes))
    if m := re.fullmatch(r"is there a (\w+) (circle|square|triangle|shape)\?", q):
        present = any(s.colour == m[1] and m[2] in ("shape", s.kind) for s in shapes)
        return "yes" if present else "no"
    if m := re.fullmatch(r"what (color is|is) the (?:(leftmost|rightmost) shape|shape in the (middle))\?", q):
        shape = ordinal(shapes, m[2] or m[3])
        return shape.colour if m[1] == "color is" else shape.kind
    if m := re.fullmatch(r"is the (\w+) (\w+) (left|right) of the (\w+) (\w+)\?", q):
        first, second = the_one(shapes, m[1], m[2]), the_one(shapes, m[4], m[5])
        is_left = first.centre[0] < second.centre[0]
        return "yes" if is_left == (m[3] == "left") else "no"
    raise AssertionError(f"unexpected question {question!r}")


def referents(expression: str, shapes: list[Shape]) -> list[Shape]:
    """The shapes an expression can mean: 'the [COLOUR] NOUN [on the left|in the middle|on the
    right|left of the COLOUR KIND|right of the COLOUR KIND]', NOUN a kind or 'shape'."""
    m = re.fullmatch(r"the (?:(\w+) )?(circle|square|triangle|shape)"
                     r"(?: (?:on the (left|right)|in the (middle)|(left|right) of the (\w+) (\w+)))?", expression)
    assert m, f"unexpected expression {expression!r}"
    colour, noun, side, middle, relation, anchor_colour, anchor_kind = m.groups()
    assert colour in (None, *COLOURS), expression
    found = [s for s in shapes if colour in (None, s.colour) and noun in ("shape", s.kind)]
    if side or middle:
        assert len(found) >= 2, f"{expression!r}: a position among {len(found)} shapes"
        return [ordinal(found, side or middle)]
    if relation:
        anchor = the_one(shapes, anchor_colour, anchor_kind)
        on_side = (lambda s: s.centre[0] < anchor.centre[0]) if relation == "left" else (
            lambda s: s.centre[0] > anchor.centre[0])
        return [s for s in found if on_side(s)]
    return found


def test_same_seed_writes_byte_identical_files(tmp_path):
    first = write_synthetic(tmp_path / "a", 30, seed=3, image_size=64)
    second = write_synthetic(tmp_path / "b", 30, seed=3, image_size=64)
    hashes = file_hashes(first.root)
    assert len(hashes) == 30 + 12  # images, two URL lists, nine annotation files, synthetic.json
    assert hashes == file_hashes(second.root)


def test_different_seeds_write_different_images_and_annotations(tmp_path):
    first = file_hashes(write_synthetic(tmp_path / "a", 30, seed=3, image_size=64).root)
    second = file_hashes(write_synthetic(tmp_path / "b", 30, seed=4, image_size=64).root)
    differing = {name for name in first if first[name] != second[name]}
    assert "annotations/dataset_coco.json" in differing
    assert "annotations/refcoco/refs(unc).p" in differing
    assert sum(name.endswith(".jpg") for name in differing) >= 25


def test_splits_are_80_10_10_with_val_and_test_images_in_val2014(dataset):
    assert dataset.splits == {"train": 160, "val": 20, "test": 20}
    assert len(list((dataset.images_dir / "train2014").glob("COCO_train2014_*.jpg"))) == 160
    assert len(list((dataset.images_dir / "val2014").glob("COCO_val2014_*.jpg"))) == 40
    with Image.open(dataset.images_dir / "train2014" / "COCO_train2014_000000000001.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
    assert load_json(dataset.parameters_file) == {
        "seed": SEED, "num_samples": NUM_SAMPLES, "image_size": SIZE, "base_url": "http://127.0.0.1:8000",
        "splits": dataset.splits, "captions": dataset.num_captions, "questions": dataset.num_questions,
        "referrals": dataset.num_referrals,
    }


def test_karpathy_coco_file_has_the_official_keys_and_five_true_captions(dataset, shapes_by_image):
    payload = load_json(dataset.karpathy_coco)
    assert payload["dataset"] == "coco" and len(payload["images"]) == NUM_SAMPLES
    sentids = []
    for imgid, image in enumerate(payload["images"]):
        assert set(image) == {"filepath", "filename", "imgid", "split", "sentids", "cocoid", "sentences"}
        assert image["imgid"] == imgid and image["split"] in ("train", "val", "test")
        assert (dataset.images_dir / image["filepath"] / image["filename"]).is_file()
        assert image["filename"] == f"COCO_{image['filepath']}_{image['cocoid']:012d}.jpg"
        raws = [s["raw"] for s in image["sentences"]]
        assert len(set(raws)) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]
        shapes = shapes_by_image[image["cocoid"]]
        assert raws[0] == " left of ".join(s.phrase() for s in shapes).capitalize() + "."
        for sentence in image["sentences"]:
            assert sentence["imgid"] == imgid
            assert sentence["tokens"] == re.findall(r"[a-z]+", sentence["raw"].lower())
            assert all(s.name in sentence["raw"].lower() for s in shapes), sentence["raw"]
        sentids += image["sentids"]
    assert sentids == list(range(5 * NUM_SAMPLES))


def test_karpathy_flickr30k_file_names_images_relative_to_the_images_folder(dataset):
    coco = load_json(dataset.karpathy_coco)["images"]
    flickr = load_json(dataset.karpathy_flickr30k)
    assert flickr["dataset"] == "flickr30k"
    for image, twin in zip(flickr["images"], coco, strict=True):
        assert set(image) == {"filename", "imgid", "split", "sentids", "sentences"}
        assert image["filename"] == f"{twin['filepath']}/{twin['filename']}"
        assert (dataset.images_dir / image["filename"]).is_file()
        assert image["sentences"] == twin["sentences"]


def test_vqa_files_have_the_official_keys_and_images(dataset):
    for subset in ("train2014", "val2014"):
        questions = load_json(dataset.vqa_questions(subset))
        annotations = load_json(dataset.vqa_annotations(subset))
        assert (questions["data_subtype"], questions["data_type"]) == (subset, "mscoco")
        assert questions["task_type"] == "Open-Ended" and annotations["data_subtype"] == subset
        for question in questions["questions"]:
            assert set(question) == {"image_id", "question", "question_id"}
            image = dataset.images_dir / subset / f"COCO_{subset}_{question['image_id']:012d}.jpg"
            assert image.is_file(), image
    for question, annotation in vqa_pairs(dataset):
        assert set(annotation) == {"question_id", "image_id", "question_type", "answer_type",
                                   "multiple_choice_answer", "answers"}
        assert (annotation["question_id"], annotation["image_id"]) == (question["question_id"], question["image_id"])
        assert annotation["answer_type"] in ("yes/no", "number", "other")
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert all(a["answer_confidence"] == "yes" for a in annotation["answers"])
    answer_list = load_json(dataset.answer_list)
    assert answer_list == sorted(set(answer_list))
    assert {a["answer"] for _, ann in vqa_pairs(dataset) for a in ann["answers"]} <= set(answer_list)


def test_every_vqa_answer_is_what_the_scene_shows(dataset, shapes_by_image):
    kinds = Counter()
    for question, annotation in vqa_pairs(dataset):
        expected = answer_of(question["question"], shapes_by_image[question["image_id"]])
        assert annotation["multiple_choice_answer"] == expected, question["question"]
        votes = Counter(a["answer"] for a in annotation["answers"])
        assert votes[expected] >= 8, (question["question"], votes)
        kinds[annotation["answer_type"]] += 1
    assert dataset.num_questions == sum(kinds.values()) >= 4 * NUM_SAMPLES
    assert min(kinds.values()) >= NUM_SAMPLES / 2, kinds


def test_some_annotators_disagree_so_answer_frequencies_matter(dataset):
    disagreeing = [ann for _, ann in vqa_pairs(dataset) if len({a["answer"] for a in ann["answers"]}) > 1]
    assert 0.1 * dataset.num_questions < len(disagreeing) < 0.4 * dataset.num_questions


def test_yes_no_answers_are_balanced(dataset):
    answers = [ann["multiple_choice_answer"] for _, ann in vqa_pairs(dataset) if ann["answer_type"] == "yes/no"]
    assert len(answers) >= 200
    assert 0.42 <= answers.count("yes") / len(answers) <= 0.58


def test_refcoco_files_have_the_official_keys(dataset):
    refs = pickle.loads(dataset.refcoco_refs.read_bytes())
    instances = load_json(dataset.refcoco_instances)
    assert [c["name"] for c in instances["categories"]] == list(SHAPES)
    assert len(instances["images"]) == NUM_SAMPLES and len(refs) == len(instances["annotations"])
    annotations = {a["id"]: a for a in instances["annotations"]}
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    for ref in refs:
        assert set(ref) >= {"ref_id", "ann_id", "image_id", "split", "sentences", "category_id", "file_name"}
        assert 1 <= len(ref["sentences"]) <= 3
        for sentence in ref["sentences"]:
            assert sentence["sent"] == sentence["raw"].lower()
            assert sentence["tokens"] == sentence["sent"].split() and isinstance(sentence["sent_id"], int)
        annotation = annotations[ref["ann_id"]]
        assert (annotation["image_id"], annotation["category_id"]) == (ref["image_id"], ref["category_id"])
        assert annotation["iscrowd"] == 0 and len(annotation["bbox"]) == 4
        assert (dataset.images_dir / ref["file_name"]).is_file()
    for image in instances["images"]:
        assert (image["width"], image["height"]) == (SIZE, SIZE)
        assert (dataset.images_dir / image["file_name"]).is_file()


def test_every_shape_has_one_ref_and_each_expression_names_only_it(dataset, shapes_by_image):
    refs = pickle.loads(dataset.refcoco_refs.read_bytes())
    boxes = {a["id"]: a["bbox"] for a in load_json(dataset.refcoco_instances)["annotations"]}
    assert len(refs) == sum(len(shapes) for shapes in shapes_by_image.values())
    for ref in refs:
        shapes = shapes_by_image[ref["image_id"]]
        (target,) = [s for s in shapes if s.coco_box() == boxes[ref["ann_id"]]]
        assert SHAPES[ref["category_id"] - 1] == target.kind
        for sentence in ref["sentences"]:
            assert referents(sentence["sent"], shapes) == [target], sentence["sent"]


def test_boxes_frame_the_drawn_shape_in_the_jpeg(dataset, shapes_by_image):
    instances = load_json(dataset.refcoco_instances)
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        shapes = shapes_by_image[annotation["image_id"]]
        (shape,) = [s for s in shapes if s.coco_box() == annotation["bbox"]]
        with Image.open(dataset.images_dir / files[annotation["image_id"]]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # (H, W, 3)
        centre = pixels[int(y + h / 2), int(x + w / 2)]
        assert np.abs(centre - COLOURS[shape.colour]).max() <= COLOUR_TOLERANCE, (shape, centre)
        mask = np.abs(pixels - np.array(COLOURS[shape.colour])).max(axis=2) <= COLOUR_TOLERANCE
        rows, cols = np.nonzero(mask)
        drawn = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        top = APEX_TOLERANCE if shape.kind == "triangle" else BOX_TOLERANCE
        tolerance = np.array([BOX_TOLERANCE, top, BOX_TOLERANCE, BOX_TOLERANCE])  # x0, y0, x1, y1
        assert (np.abs(np.subtract(drawn, (x, y, x + w, y + h))) <= tolerance).all(), (shape, drawn)


def test_url_list_has_one_row_per_image_pointing_to_existing_files(dataset):
    table = pq.read_table(dataset.urls_parquet).to_pylist()
    with dataset.urls_csv.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == table
    assert len(table) == NUM_SAMPLES
    for row in table:
        assert row["url"] == f"http://127.0.0.1:8000/{row['path']}"
        assert (dataset.root / row["path"]).is_file()
    assert table[0]["caption"] == load_json(dataset.karpathy_coco)["images"][0]["sentences"][0]["raw"][:-1].lower()


def test_write_url_list_points_the_urls_at_another_server(tmp_path):
    dataset = write_synthetic(tmp_path, 5, seed=1, image_size=64)
    write_url_list(tmp_path, "http://127.0.0.1:40123/")
    rows = pq.read_table(dataset.urls_parquet).to_pylist()
    assert rows[0]["url"] == "http://127.0.0.1:40123/images/train2014/COCO_train2014_000000000001.jpg"
    assert all(row["url"] == f"http://127.0.0.1:40123/{row['path']}" for row in rows)
    assert load_json(dataset.parameters_file)["base_url"] == "http://127.0.0.1:40123"


def test_every_word_written_is_in_the_tokenizer_vocabulary(dataset):
    vocabulary = {word for text in vocabulary_texts() for word in text.split()}
    texts = [s["raw"].lower() for image in load_json(dataset.karpathy_coco)["images"] for s in image["sentences"]]
    for question, annotation in vqa_pairs(dataset):
        texts += [question["question"].lower(), *(a["answer"] for a in annotation["answers"])]
    texts += [s["sent"] for ref in pickle.loads(dataset.refcoco_refs.read_bytes()) for s in ref["sentences"]]
    words = {word for text in texts for word in re.findall(r"\w+|[^\w\s]", text)}
    assert words - {"."} <= vocabulary, words - vocabulary


def test_invalid_arguments_are_refused_with_the_value_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="num_samples must be at least 1, got 0"):
        write_synthetic(tmp_path, 0)
    with pytest.raises(ValueError, match="image_size must be at least 32 pixels, got 8"):
        write_synthetic(tmp_path, 4, image_size=8)
    with pytest.raises(ValueError, match=r"'ftp://host' is not an http\(s\) address"):
        write_synthetic(tmp_path, 4, base_url="ftp://host")


def test_mplug_data_synthetic_writes_the_data_set(tmp_path, capsys):
    assert main(["data", "synthetic", "--output", str(tmp_path), "--num-samples", "10", "--seed", "2",
                 "--image-size", "64", "--base-url", "http://127.0.0.1:9000"]) == 0
    assert "wrote 10 synthetic images (8 train, 1 val, 1 test)" in capsys.readouterr().out
    description = load_json(tmp_path / "synthetic.json")
    assert (description["seed"], description["image_size"], description["base_url"]) == (2, 64, "http://127.0.0.1:9000")
    assert pq.read_table(tmp_path / "urls.parquet").num_rows == 10
