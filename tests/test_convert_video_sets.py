"""`mplug data convert webvid` (CSV -> URL lists) and `msrvtt_retrieval` (1k-A split -> shards).

Every input is written here in the dataset's released format; videos are dummy bytes, copied as
they are (the converters never decode them).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from test_convert import read_output_json, read_split, write_videos

from cluster.cli import main
from data_prep.convert import InputError, convert_msrvtt_retrieval, convert_webvid

WEBVID_COLUMNS = ["videoid", "contentUrl", "duration", "page_dir", "name"]


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


# ---- WebVid ----------------------------------------------------------------------------------------


def webvid_row(videoid: int, name: str = "", url: str | None = None) -> list:
    url = f"https://ak.picdn.net/shutterstock/videos/{videoid}/preview/stock-footage-{videoid}.mp4" if url is None else url
    return [videoid, url, "PT00H01M05S", "006001_006050", name or f"aerial view of beach {videoid}, waves"]


def test_webvid_csvs_become_url_lists_with_splits_and_bad_rows_reported(tmp_path):
    train = write_csv(tmp_path / "results_2M_train.csv", WEBVID_COLUMNS, [
        webvid_row(21179416), webvid_row(5629184, url=""), webvid_row(1063125, name=" "), webvid_row(1047262)])
    val = write_csv(tmp_path / "results_2M_val.csv", WEBVID_COLUMNS, [webvid_row(31353427), webvid_row(21179416)])
    out = tmp_path / "webvid"
    assert main(["data", "convert", "webvid", "--train", str(train), "--val", str(val), "--output", str(out)]) == 0

    urls = pd.read_parquet(out / "train.parquet")
    assert list(urls.columns) == ["url", "caption", "key", "duration", "page_dir"]
    assert urls["key"].tolist() == ["21179416", "1047262"]
    first = urls.iloc[0].to_dict()
    assert first["caption"] == "aerial view of beach 21179416, waves"  # the comma survives the CSV
    assert first["url"].endswith("/21179416/preview/stock-footage-21179416.mp4")
    assert (first["duration"], first["page_dir"]) == (65.0, "006001_006050")
    assert pd.read_parquet(out / "val.parquet")["key"].tolist() == ["31353427"]
    assert read_output_json(out, "splits.json") == {"train": {"count": 2, "ids": ["21179416", "1047262"]},
                                                    "val": {"count": 1, "ids": ["31353427"]}}
    report = read_output_json(out, "report.json")
    assert report["converted"] == {"train": 2, "val": 1}
    assert report["skipped"] == {"malformed": 2, "duplicate": 1}
    assert [p["text"] for p in report["problems"]] == [
        "results_2M_train.csv: line 3 (videoid 5629184): 'contentUrl' is blank",
        "results_2M_train.csv: line 4 (videoid 1063125): 'name' is blank",
        "results_2M_val.csv: line 3 (videoid 21179416): videoid 21179416 was met before; each video is listed once",
    ]


def test_webvid_val_fraction_holds_out_the_same_rows_whatever_their_order(tmp_path):
    rows = [webvid_row(n) for n in range(1000, 1200)]
    split = {}
    for name, ordered in (("forward", rows), ("backward", rows[::-1])):
        csv_path = write_csv(tmp_path / f"{name}.csv", WEBVID_COLUMNS, ordered)
        report = convert_webvid(tmp_path / name, train=[csv_path], val_fraction=0.1)
        split[name] = set(pd.read_parquet(tmp_path / name / "val.parquet")["key"])
        assert report.converted["train"] + report.converted["val"] == 200
    assert split["forward"] == split["backward"]
    assert 5 <= len(split["forward"]) <= 40  # about 10% of 200


def test_webvid_csv_without_its_columns_names_the_ones_it_has(tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", ["id", "url", "caption"], [[1, "http://x/1.mp4", "a"]])
    with pytest.raises(InputError, match=r"has no column videoid, contentUrl, name \(its columns: \['id', 'url', 'caption'\]\)"):
        convert_webvid(tmp_path / "out", train=[csv_path])


# ---- MSRVTT retrieval, 1k-A --------------------------------------------------------------------------


@pytest.fixture
def msrvtt(tmp_path):
    """Train video0, video1 (and video5, whose captions are missing); test video7, video8 (and
    video9, whose file is missing); captions split over the two videodatainfo files."""
    root = tmp_path / "videos"
    write_videos(root, ["video0", "video1", "video5", "video7", "video8"], "mp4")
    train_val = tmp_path / "train_val_videodatainfo.json"
    train_val.write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train", "id": 0}, {"video_id": "video1", "split": "validate", "id": 1}],
        "sentences": [{"caption": "a man sings", "video_id": "video0", "sen_id": 0},
                      {"caption": "someone is singing", "video_id": "video0", "sen_id": 1},
                      {"caption": "a car drives", "video_id": "video1", "sen_id": 2}]}))
    test_info = tmp_path / "test_videodatainfo.json"
    test_info.write_text(json.dumps({"videos": [], "sentences": [
        {"caption": "a red car on a road", "video_id": "video1", "sen_id": 140200}]}))
    train_csv = write_csv(tmp_path / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"], ["video5"]])
    test_csv = write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv", ["", "key", "vid_key", "video_id", "sentence"], [
        [0, "ret0", "msr7", "video7", "a cartoon of a dog"],
        [1, "ret1", "msr8", "video8", "people dance at a party"],
        [2, "ret2", "msr9", "video9", "a woman cooks"]])
    return root, [train_val, test_info], train_csv, test_csv


def test_msrvtt_retrieval_train_holds_every_caption_of_the_9k_videos_with_integer_ids(msrvtt, tmp_path):
    root, annotations, train_csv, test_csv = msrvtt
    report = convert_msrvtt_retrieval(tmp_path / "out", root, train_csv=train_csv, annotations=annotations,
                                      test_csv=test_csv)
    assert report.converted == {"train": 4, "test": 2}
    train = read_split(tmp_path / "out", "train")
    assert sorted(train) == ["video0_0", "video0_1", "video1_140200", "video1_2"]
    assert train["video1_140200"]["txt"] == b"a red car on a road"
    assert train["video1_140200"]["mp4"] == (root / "video1.mp4").read_bytes()
    assert json.loads(train["video1_140200"]["json"]) == {
        "key": "video1_140200", "image_id": 1, "video_id": "video1", "source": "msrvtt",
        "captions": ["a car drives", "a red car on a road"], "split": "train", "sent_id": 140200}


def test_msrvtt_retrieval_test_is_one_sample_per_jsfusion_pair(msrvtt, tmp_path):
    root, annotations, train_csv, test_csv = msrvtt
    out = tmp_path / "out"
    assert main(["data", "convert", "msrvtt_retrieval", "--train-csv", str(train_csv), "--test-csv", str(test_csv),
                 *[arg for path in annotations for arg in ("--annotations", str(path))],
                 "--video-root", str(root), "--output", str(out)]) == 0
    test = read_split(out, "test")
    assert sorted(test) == ["video7", "video8"]
    assert json.loads(test["video7"]["json"]) == {
        "key": "video7", "image_id": 7, "video_id": "video7", "source": "msrvtt", "jsfusion_key": "ret0",
        "captions": ["a cartoon of a dog"], "split": "test"}
    assert read_output_json(out, "splits.json") == {"train": {"count": 4, "ids": ["video0", "video1"]},
                                                    "test": {"count": 2, "ids": ["video7", "video8"]}}
    assert read_output_json(out, "test/manifest.json")["task"] == "video_retrieval"
    report = read_output_json(out, "report.json")
    assert report["skipped"] == {"unmatched": 1, "missing_media": 1}
    assert [p["text"].split(": ", 2)[:2] for p in report["problems"]] == [
        ["MSRVTT_train.9k.csv", "line 4 (video_id video5)"], ["MSRVTT_JSFUSION_test.csv", "line 4 (key ret2)"]]


def test_msrvtt_retrieval_train_list_without_captions_is_an_error(msrvtt, tmp_path):
    root, _, train_csv, _ = msrvtt
    with pytest.raises(InputError, match="lists video ids only: give the captions with --annotations"):
        convert_msrvtt_retrieval(tmp_path / "out", root, train_csv=train_csv)
