"""`mplug data convert FORMAT`: official annotation files -> shards, splits.json and report.json.

Every fixture is written here in the dataset's released format, with tiny PIL images and dummy
video bytes.
"""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cluster.cli import main
from data_prep.convert import (
    ConversionError,
    InputError,
    convert_coco_karpathy,
    convert_flickr30k,
    convert_msrvtt_caption,
    convert_msrvtt_qa,
    convert_msvd_caption,
    convert_msvd_qa,
    convert_refcoco,
    convert_vqa_v2,
)

# ---- fixture writers and shard readers -----------------------------------------------------------


def write_image(path: Path, size: tuple[int, int] = (8, 6), fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    return path.read_bytes()


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


def read_split(output: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard of OUTPUT/split."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((output / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def read_output_json(output: Path, name: str) -> dict:
    return json.loads((output / name).read_text())


def coco_entry(cocoid: int, split: str, captions: list[str], folder: str = "val2014") -> dict:
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": cocoid, "sentid": cocoid * 10 + i}
                 for i, c in enumerate(captions)]
    return {"filepath": folder, "filename": filename, "imgid": cocoid, "split": split, "cocoid": cocoid,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences}


@pytest.fixture
def coco(tmp_path):
    """A Karpathy COCO file: train, restval, val and test images, and their image files."""
    root = tmp_path / "images"
    entries = [
        coco_entry(1, "train", ["A red bus.", "A bus on a road."], folder="train2014"),
        coco_entry(2, "restval", ["Two dogs.", "Dogs playing."]),
        coco_entry(3, "val", ["A cat on a sofa.", "A sleeping cat.", "Cat."]),
        coco_entry(4, "test", ["A kite in the sky."]),
    ]
    originals = {e["cocoid"]: write_image(root / e["filepath"] / e["filename"]) for e in entries}
    annotations = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": entries})
    return annotations, root, originals


# ---- Karpathy captions ---------------------------------------------------------------------------


def test_coco_restval_goes_to_train_one_sample_per_caption(coco, tmp_path):
    annotations, root, originals = coco
    report = convert_coco_karpathy(annotations, tmp_path / "out", root)
    assert report.converted == {"train": 4, "val": 1, "test": 1}
    splits = read_output_json(tmp_path / "out", "splits.json")
    assert splits["train"] == {"count": 4, "ids": [1, 2]}
    train = read_split(tmp_path / "out", "train")
    assert sorted(train) == ["1_10", "1_11", "2_20", "2_21"]
    sample = train["2_21"]
    assert sample["txt"] == b"Dogs playing."
    assert sample["jpg"] == originals[2]  # JPEG bytes are copied, not re-encoded
    assert meta(sample) == {"key": "2_21", "image_id": 2, "source": "coco", "captions": ["Two dogs.", "Dogs playing."],
                            "split": "train", "sent_id": 21}


def test_coco_eval_splits_hold_one_sample_per_image_with_all_captions(coco, tmp_path):
    annotations, root, _ = coco
    convert_coco_karpathy(annotations, tmp_path / "out", root)
    val = read_split(tmp_path / "out", "val")
    assert list(val) == ["3"]
    assert val["3"]["txt"] == b"A cat on a sofa."
    assert meta(val["3"])["captions"] == ["A cat on a sofa.", "A sleeping cat.", "Cat."]
    manifest = read_output_json(tmp_path / "out" / "val", "manifest.json")
    assert manifest["count"] == 1 and manifest["task"] == "caption" and manifest["format"] == "coco_karpathy"
    assert read_output_json(tmp_path / "out", "splits.json")["test"] == {"count": 1, "ids": [4]}


def test_flickr30k_reads_root_filename_and_reencodes_png(tmp_path):
    root = tmp_path / "flickr"
    write_image(root / "1000092795.jpg")
    write_image(root / "2000.jpg", fmt="PNG")  # a PNG under a .jpg name
    images = [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentids": [0],
         "sentences": [{"tokens": ["two", "men"], "raw": "Two men.", "imgid": 0, "sentid": 0}]},
        {"filename": "2000.jpg", "imgid": 1, "split": "test", "sentids": [5, 6],
         "sentences": [{"raw": "A girl.", "imgid": 1, "sentid": 5}, {"raw": "A child.", "imgid": 1, "sentid": 6}]},
    ]
    annotations = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": images})
    report = convert_flickr30k(annotations, tmp_path / "out", root)
    assert report.converted == {"train": 1, "test": 1}
    test = read_split(tmp_path / "out", "test")
    assert meta(test["1"])["image_id"] == 1 and meta(test["1"])["source"] == "flickr30k"
    assert test["1"]["jpg"][:3] == b"\xff\xd8\xff"
    assert Image.open(tarfile.io.BytesIO(test["1"]["jpg"])).size == (8, 6)


def test_karpathy_file_of_the_other_dataset_is_an_error(coco, tmp_path):
    annotations, root, _ = coco
    with pytest.raises(InputError, match="says dataset 'coco'.*use FORMAT coco_karpathy"):
        convert_flickr30k(annotations, tmp_path / "out", root)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def broken_coco(coco):
    """images[1] lacks 'sentences', images[3] points at a file that is not there."""
    annotations, root, _ = coco
    payload = json.loads(annotations.read_text())
    del payload["images"][1]["sentences"]
    payload["images"][3]["filename"] = "COCO_val2014_000000000099.jpg"
    write_json(annotations, payload)
    return annotations, root


def test_malformed_record_and_missing_image_are_skipped_and_reported(broken_coco, tmp_path):
    annotations, root = broken_coco
    out = tmp_path / "out"
    assert main(["data", "convert", "coco_karpathy", "--annotations", str(annotations),
                 "--output", str(out), "--image-root", str(root)]) == 0
    report = read_output_json(out, "report.json")
    assert report["converted"] == {"train": 2, "val": 1}
    assert report["skipped"] == {"malformed": 1, "missing_media": 1}
    first, second = report["problems"]
    assert first["text"] == "dataset_coco.json: images[1] (cocoid 2): missing 'sentences'"
    assert (second["file"], second["record"]) == ("dataset_coco.json", "images[3] (cocoid 4)")
    assert second["message"].startswith("image val2014/COCO_val2014_000000000099.jpg not found under")
    assert read_output_json(out, "splits.json")["train"]["ids"] == [1]


def test_strict_fails_at_the_first_problem_with_its_message(broken_coco, tmp_path):
    annotations, root = broken_coco
    with pytest.raises(SystemExit, match=r"dataset_coco.json: images\[1\] \(cocoid 2\): missing 'sentences'"):
        main(["data", "convert", "coco_karpathy", "--annotations", str(annotations),
              "--output", str(tmp_path / "out"), "--image-root", str(root), "--strict"])
    with pytest.raises(ConversionError, match="missing 'sentences'"):
        convert_coco_karpathy(annotations, tmp_path / "api", root, strict=True)


def test_wrong_type_names_the_value_and_the_expected_type(coco, tmp_path):
    annotations, root, _ = coco
    payload = json.loads(annotations.read_text())
    payload["images"][0]["cocoid"] = "one"
    write_json(annotations, payload)
    report = convert_coco_karpathy(annotations, tmp_path / "out", root)
    assert str(report.problems[0]) == "dataset_coco.json: images[0] (cocoid one): 'cocoid' is 'one' (str); expected an integer"


def test_file_that_is_not_json_or_not_the_expected_shape_is_a_clear_error(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"broken.json is not valid JSON .*expected Karpathy's split file"):
        main(["data", "convert", "coco_karpathy", "--annotations", str(tmp_path / "broken.json"),
              "--output", str(tmp_path / "out"), "--image-root", str(root)])
    shaped = write_json(tmp_path / "list.json", [{"filename": "x.jpg"}])
    with pytest.raises(InputError, match=r"list.json: the top level is a list, not an object with 'images'; expected"):
        convert_coco_karpathy(shaped, tmp_path / "out", root)


def test_limit_caps_the_samples_of_each_split(coco, tmp_path):
    annotations, root, _ = coco
    report = convert_coco_karpathy(annotations, tmp_path / "out", root, limit=3, shard_size=2)
    assert report.converted == {"train": 3, "val": 1, "test": 1}
    shards = read_output_json(tmp_path / "out" / "train", "manifest.json")["shards"]
    assert shards == [{"url": "00000.tar", "count": 2}, {"url": "00001.tar", "count": 1}]


# ---- VQA v2 and Visual Genome --------------------------------------------------------------------


def vqa_files(tmp_path: Path) -> tuple[list[Path], list[Path], Path]:
    root = tmp_path / "coco"
    write_image(root / "train2014" / "COCO_train2014_000000000009.jpg")
    write_image(root / "test2015" / "COCO_test2015_000000000001.jpg")
    questions = [
        write_json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", {
            "data_subtype": "train2014", "task_type": "Open-Ended",
            "questions": [{"image_id": 9, "question": "Is it red?", "question_id": 9000}]}),
        write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", {
            "data_subtype": "test2015",
            "questions": [{"image_id": 1, "question": "What is it?", "question_id": 1000}]}),
    ]
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["yes"] * 4 + ["no", "no", "no"] + ["yes"] * 3)]
    annotations = [write_json(tmp_path / "v2_mscoco_train2014_annotations.json", {
        "data_subtype": "train2014",
        "annotations": [{"question_id": 9000, "image_id": 9, "question_type": "is it", "answer_type": "yes/no",
                         "multiple_choice_answer": "yes", "answers": answers}]})]
    return questions, annotations, root


def test_vqa_weights_are_the_share_of_annotators_per_unique_answer(tmp_path):
    questions, annotations, root = vqa_files(tmp_path)
    report = convert_vqa_v2(questions, tmp_path / "out", root, annotations=annotations)
    assert report.converted == {"train": 1, "test": 1}
    sample = read_split(tmp_path / "out", "train")["9000"]
    assert sample["txt"] == b"Is it red?"
    fields = meta(sample)
    assert dict(zip(fields["answers"], fields["weights"], strict=True)) == {"yes": 0.7, "no": 0.3}
    assert fields["answers"] == ["yes", "no"]  # most frequent first
    assert (fields["question_id"], fields["image_id"], fields["source"]) == (9000, 9, "vqa")
    assert (fields["answer_type"], fields["question_type"]) == ("yes/no", "is it")


def test_vqa_test_questions_have_no_answers(tmp_path):
    questions, annotations, root = vqa_files(tmp_path)
    convert_vqa_v2(questions, tmp_path / "out", root, annotations=annotations)
    fields = meta(read_split(tmp_path / "out", "test")["1000"])
    assert (fields["answers"], fields["weights"], fields["answer_type"]) == ([], [], None)
    assert read_output_json(tmp_path / "out", "splits.json")["test"] == {"count": 1, "ids": [1000]}


def test_vqa_train_questions_without_their_annotations_file_is_an_error(tmp_path):
    questions, _, root = vqa_files(tmp_path)
    with pytest.raises(InputError, match="no annotations file covers train2014"):
        convert_vqa_v2(questions, tmp_path / "out", root)


def test_visual_genome_qa_joins_train_with_source_vg(tmp_path):
    questions, annotations, root = vqa_files(tmp_path)
    vg_root = tmp_path / "vg"
    write_image(vg_root / "42.jpg")
    vg = write_json(tmp_path / "question_answers.json", [{"id": 42, "qas": [
        {"qa_id": 7, "image_id": 42, "question": "What color is the bus?", "answer": "Green."},
        {"qa_id": 8, "image_id": 43, "question": "Where?", "answer": "Road."}]}])
    report = convert_vqa_v2(questions[:1], tmp_path / "out", [root, vg_root], annotations=annotations, vg_qa=vg)
    assert report.converted == {"train": 2} and report.skipped == {"missing_media": 1}
    assert report.problems[0].record == "[0].qas[1] (qa_id 8)"
    fields = meta(read_split(tmp_path / "out", "train")["vg_7"])
    assert (fields["answers"], fields["weights"], fields["source"]) == (["green"], [1.0], "vg")
    assert read_output_json(tmp_path / "out", "splits.json")["train"]["ids"] == [9000, "vg_7"]


def test_vqa_question_without_annotation_is_unmatched(tmp_path):
    questions, annotations, root = vqa_files(tmp_path)
    payload = json.loads(annotations[0].read_text())
    payload["annotations"][0]["question_id"] = 9001
    write_json(annotations[0], payload)
    report = convert_vqa_v2(questions, tmp_path / "out", root, annotations=annotations)
    assert report.skipped == {"unmatched": 1}
    assert str(report.problems[0]) == ("v2_OpenEnded_mscoco_train2014_questions.json: questions[0] (question_id 9000): "
                                       "no annotation with question_id 9000 in v2_mscoco_train2014_annotations.json")


# ---- RefCOCO family ------------------------------------------------------------------------------


def refcoco_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "coco"
    write_image(root / "train2014" / "COCO_train2014_000000581857.jpg", size=(64, 48))
    refs = [
        {"ref_id": 5, "ann_id": 100, "image_id": 581857, "split": "testA", "category_id": 1,
         "file_name": "COCO_train2014_000000581857_100.jpg",
         "sentences": [{"sent": "man on left", "raw": "Man on left", "tokens": ["man", "on", "left"], "sent_id": 11},
                       {"sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"], "sent_id": 12}]},
        {"ref_id": 6, "ann_id": 999, "image_id": 581857, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000581857_999.jpg",
         "sentences": [{"sent": "nobody", "raw": "nobody", "tokens": ["nobody"], "sent_id": 13}]},
    ]
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    instances = write_json(tmp_path / "instances.json", {
        "images": [{"id": 581857, "file_name": "train2014/COCO_train2014_000000581857.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 100, "image_id": 581857, "bbox": [3.5, 4.0, 20.25, 30.0], "category_id": 1}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}]})
    return refs_path, instances, root


def test_refcoco_one_sample_per_sentence_with_pixel_box_and_image_size(tmp_path):
    refs, instances, root = refcoco_files(tmp_path)
    report = convert_refcoco(refs, instances, tmp_path / "out", root, dataset="refcoco+")
    assert report.converted == {"testA": 2}
    samples = read_split(tmp_path / "out", "testA")
    assert sorted(samples) == ["5_11", "5_12"]
    assert samples["5_12"]["txt"] == b"left guy"
    assert meta(samples["5_12"]) == {
        "key": "5_12", "ref_id": 5, "ann_id": 100, "image_id": 581857, "box": [3.5, 4.0, 20.25, 30.0],
        "image_size": [64, 48], "category": "person", "category_id": 1, "source": "refcoco+",
        "sentence": "left guy", "sent_id": 12}
    assert read_output_json(tmp_path / "out", "splits.json") == {"testA": {"count": 2, "ids": [5]}}


def test_refcoco_ref_without_its_annotation_is_reported(tmp_path):
    refs, instances, root = refcoco_files(tmp_path)
    report = convert_refcoco(refs, instances, tmp_path / "out", root)
    assert report.skipped == {"unmatched": 1}
    assert str(report.problems[0]) == "refs(unc).p: refs[1] (ref_id 6): ann_id 999 is not among the annotations of instances.json"


def test_refs_pickle_that_would_run_code_is_refused(tmp_path):
    _, instances, root = refcoco_files(tmp_path)
    evil = tmp_path / "refs(umd).p"
    evil.write_bytes(pickle.dumps(Path("x")))
    with pytest.raises(InputError, match="refers to pathlib"):
        convert_refcoco(evil, instances, tmp_path / "out", root, dataset="refcocog")


# ---- video: MSRVTT and MSVD ----------------------------------------------------------------------


def write_videos(root: Path, names: list[str], extension: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.{extension}").write_bytes(b"\x00\x00\x00\x18ftypmp42" + name.encode())


def test_msrvtt_caption_renames_validate_to_val_and_copies_videos(tmp_path):
    root = tmp_path / "videos"
    write_videos(root, ["video0", "video1"], "mp4")
    info = write_json(tmp_path / "train_val_videodatainfo.json", {
        "videos": [{"video_id": "video0", "split": "train", "id": 0, "category": 9},
                   {"video_id": "video1", "split": "validate", "id": 1, "category": 3}],
        "sentences": [{"caption": "a man sings", "video_id": "video0", "sen_id": 0},
                      {"caption": "someone is singing", "video_id": "video0", "sen_id": 1},
                      {"caption": "a car drives", "video_id": "video1", "sen_id": 2}]})
    report = convert_msrvtt_caption([info], tmp_path / "out", root)
    assert report.converted == {"train": 2, "val": 1}
    train = read_split(tmp_path / "out", "train")
    assert train["video0_1"]["mp4"] == (root / "video0.mp4").read_bytes()
    assert meta(train["video0_1"])["captions"] == ["a man sings", "someone is singing"]
    val = read_split(tmp_path / "out", "val")
    assert val["video1"]["txt"] == b"a car drives" and meta(val["video1"])["video_id"] == "video1"
    assert read_output_json(tmp_path / "out", "splits.json")["val"] == {"count": 1, "ids": ["video1"]}


def test_msrvtt_qa_reads_video_n_for_integer_video_id(tmp_path):
    root = tmp_path / "videos"
    write_videos(root, ["video7"], "mp4")
    test = write_json(tmp_path / "test_qa.json", [{"answer": "dog", "id": 3, "question": "what runs?", "video_id": 7}])
    report = convert_msrvtt_qa(tmp_path / "out", root, test=test)
    assert report.converted == {"test": 1}
    fields = meta(read_split(tmp_path / "out", "test")["3"])
    assert fields == {"key": "3", "question_id": 3, "video_id": "video7", "question": "what runs?",
                      "answers": ["dog"], "weights": [1.0], "source": "msrvtt"}


def test_msvd_qa_maps_vid_numbers_to_youtube_names_and_keeps_avi(tmp_path):
    root = tmp_path / "videos"
    write_videos(root, ["-4wsuPCjDBc_5_15"], "avi")
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
    train = write_json(tmp_path / "train_qa.json", [
        {"answer": "squirrel", "id": 0, "question": "what is eating?", "video_id": 1},
        {"answer": "man", "id": 1, "question": "who talks?", "video_id": 5}])
    report = convert_msvd_qa(mapping, tmp_path / "out", root, train=train)
    assert report.converted == {"train": 1} and report.skipped == {"unmatched": 1}
    sample = read_split(tmp_path / "out", "train")["0"]
    assert "avi" in sample and meta(sample)["video_id"] == "-4wsuPCjDBc_5_15"
    assert str(report.problems[0]) == "train_qa.json: [1] (id 1): video_id 5 (vid5) is not in youtube_mapping.txt"


def msvd_descriptions(tmp_path: Path, names: list[str]) -> Path:
    lines = ["# MSVD descriptions", "# VideoID Description"]
    lines += [f"{name} caption {i} of {name}" for name in names for i in range(2)]
    path = tmp_path / "AllVideoDescriptions.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_msvd_caption_takes_splits_from_list_files(tmp_path):
    names = ["vA_1_2", "vB_3_4", "vC_5_6"]
    root = tmp_path / "videos"
    write_videos(root, names, "avi")
    descriptions = msvd_descriptions(tmp_path, names)
    (tmp_path / "train.txt").write_text("vC_5_6\nvA_1_2\n")
    (tmp_path / "test.txt").write_text("vB_3_4\n")
    report = convert_msvd_caption(descriptions, tmp_path / "out", root,
                                  train_list=tmp_path / "train.txt", test_list=tmp_path / "test.txt")
    assert report.converted == {"train": 4, "test": 1}
    splits = read_output_json(tmp_path / "out", "splits.json")
    assert splits["train"]["ids"] == ["vC_5_6", "vA_1_2"]
    test = read_split(tmp_path / "out", "test")
    assert test["vB_3_4"]["txt"] == b"caption 0 of vB_3_4"
    assert meta(test["vB_3_4"])["captions"] == ["caption 0 of vB_3_4", "caption 1 of vB_3_4"]


def test_msvd_caption_standard_split_follows_the_mapping_order(tmp_path):
    names = ["vA_1_2", "vB_3_4", "vC_5_6", "vD_7_8"]
    root = tmp_path / "videos"
    write_videos(root, names, "avi")
    descriptions = msvd_descriptions(tmp_path, names)
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("vD_7_8 vid1\nvC_5_6 vid2\nvB_3_4 vid3\nvA_1_2 vid4\n")
    report = convert_msvd_caption(descriptions, tmp_path / "out", root, mapping=mapping, split_sizes=(2, 1, 1))
    splits = read_output_json(tmp_path / "out", "splits.json")
    assert {split: entry["ids"] for split, entry in splits.items()} == {
        "train": ["vD_7_8", "vC_5_6"], "val": ["vB_3_4"], "test": ["vA_1_2"]}
    assert report.converted == {"train": 4, "val": 1, "test": 1}


def test_cli_converts_video_qa_with_video_root(tmp_path):
    root = tmp_path / "videos"
    write_videos(root, ["video2"], "mp4")
    val = write_json(tmp_path / "val_qa.json", [{"answer": "cat", "id": 9, "question": "what sits?", "video_id": 2}])
    assert main(["data", "convert", "msrvtt_qa", "--val", str(val), "--output", str(tmp_path / "out"),
                 "--video-root", str(root)]) == 0
    assert read_output_json(tmp_path / "out", "val/manifest.json")["task"] == "video_qa"
