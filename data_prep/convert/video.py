"""MSRVTT and MSVD, captions, QA and retrieval -> video shards (`KEY.mp4|avi|webm`, `KEY.txt`, `KEY.json`).

Inputs, as released:

- MSRVTT captions: `train_val_videodatainfo.json`, `test_videodatainfo.json`: {"videos":
  [{"video_id": "video0", "split": "train|validate|test", "id": 0}], "sentences": [{"caption",
  "video_id", "sen_id"}]}; videos `ROOT/video0.mp4`. `validate` is written as `val`.
- MSRVTT-QA: `{train,val,test}_qa.json`: [{"answer", "id", "question", "video_id": 0}], the
  video being `ROOT/video0.mp4`.
- MSRVTT retrieval, the 1k-A split of JSFusion (CLIP4Clip's `msrvtt_data.zip`):
  `MSRVTT_train.9k.csv` (column `video_id`: 9,000 train videos) with their 20 captions each from
  the videodatainfo files (both: the 9k take test videos too) or `MSRVTT_data.json`, and
  `MSRVTT_JSFUSION_test.csv` (columns `key, vid_key, video_id, sentence`: 1,000 video-sentence
  pairs, the test set).
- MSVD-QA: `{train,val,test}_qa.json` of the same shape with `video_id: 1`, and
  `youtube_mapping.txt` lines `-4wsuPCjDBc_5_15 vid1` naming the video `ROOT/-4wsuPCjDBc_5_15.avi`.
- MSVD captions: `AllVideoDescriptions.txt`, `#` header lines then `youtube_name caption words`.
  Splits come from list files (one video name a line) when given; otherwise the standard
  1,200 / 100 / 670 split by order: the vid1..vid1970 order of `youtube_mapping.txt` when it is
  given, else the order in which videos first appear in the descriptions.

Video files are copied undecoded with their own extension (`video_ext` says which file to look
for: mp4 for MSRVTT, avi for MSVD as released). `video_id` is the file name without extension in
every task field ("video0", "-4wsuPCjDBc_5_15"), so captions and QA of one corpus join on it.

Captions use the layout of `karpathy.py`: in train one sample per (video, caption), key
`VIDEOID_SENTID`; in val/test one sample per video, key `VIDEOID`, txt = its first caption.
Fields: video_id, captions, split, source, and sent_id on train samples. splits.json lists
video ids. QA: one sample per question, key `QUESTIONID`, txt = the question; fields
question_id, video_id, question, answers ([answer]), weights ([1.0]), source; splits.json lists
question ids. Retrieval: the caption layout in train and test (test's one caption is its JSFusion
sentence), plus `image_id`, the integer N of `videoN`, which the retrieval task reads to keep a
video's captions from being each other's negatives; test fields also carry `jsfusion_key`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.convert.common import Conversion, caption_samples, read_json, top_list
from data_prep.convert.report import (
    UNMATCHED,
    ConvertReport,
    InputError,
    RecordProblem,
    label,
    need,
)
from data_prep.shard_writer import Sample

MSRVTT_SPLITS = {"train": "train", "validate": "val", "test": "test"}
MSVD_SPLIT_SIZES = (1200, 100, 670)  # train, val, test
SPLIT_NAMES = ("train", "val", "test")
MSRVTT_EXPECTED = 'MSRVTT videodatainfo {"videos": [{"video_id", "split"}], "sentences": [{"caption", "video_id", "sen_id"}]}'
JSFUSION_COLUMNS = ("key", "vid_key", "video_id", "sentence")
QA_EXPECTED = 'a video QA file [{"answer", "id", "question", "video_id"}]'


def convert_msrvtt_caption(
    annotations: Sequence[str | Path], output: str | Path, video_root: Any, *, video_ext: str = "mp4", **settings: Any
) -> ConvertReport:
    """MSRVTT captions from `train_val_videodatainfo.json` and/or `test_videodatainfo.json`."""
    with Conversion("msrvtt_caption", "video_caption", output, video_root, **settings) as run:
        for path in map(Path, annotations):
            payload = read_json(path, MSRVTT_EXPECTED)
            videos = top_list(payload, "videos", path, MSRVTT_EXPECTED)
            captions = read_msrvtt_sentences(run, payload, path)
            for position, video in enumerate(videos):
                with run.record(path.name, label("videos", position, video, "video_id")):
                    split = need(video, "split", str)
                    if split not in MSRVTT_SPLITS:
                        raise RecordProblem(f"split {split!r} is not one of {sorted(MSRVTT_SPLITS)}")
                    split = MSRVTT_SPLITS[split]
                    if run.full(split):
                        continue
                    video_id = need(video, "video_id", str)
                    if video_id not in captions:
                        raise RecordProblem(f"no sentence of {path.name} has video_id {video_id!r}", UNMATCHED)
                    meta = {"video_id": video_id, "source": "msrvtt"}
                    media = run.video(f"{video_id}.{video_ext}")
                    run.write(split, caption_samples(split, video_id, media, captions[video_id], meta), video_id)
        return run.finish()


def read_msrvtt_sentences(run: Conversion, payload: Any, path: Path) -> dict[str, list[tuple[int, str]]]:
    """video_id -> its (sen_id, caption) pairs, from the "sentences" of an MSRVTT videodatainfo file."""
    captions: dict[str, list[tuple[int, str]]] = {}
    for position, sentence in enumerate(top_list(payload, "sentences", path, MSRVTT_EXPECTED)):
        with run.record(path.name, label("sentences", position, sentence, "sen_id")):
            entry = (need(sentence, "sen_id", int), need(sentence, "caption", str).strip())
            if not entry[1]:
                raise RecordProblem("'caption' is blank")
            captions.setdefault(need(sentence, "video_id", str), []).append(entry)
    return captions


def convert_msrvtt_retrieval(
    output: str | Path,
    video_root: Any,
    *,
    train_csv: str | Path | None = None,
    annotations: Sequence[str | Path] = (),
    test_csv: str | Path | None = None,
    video_ext: str = "mp4",
    **settings: Any,
) -> ConvertReport:
    """MSRVTT text-video retrieval, the 1k-A split: train from `MSRVTT_train.9k.csv` with every
    caption of its videos in `annotations`, test from `MSRVTT_JSFUSION_test.csv`."""
    if train_csv is None and test_csv is None:
        raise InputError("no split file given; expected MSRVTT_train.9k.csv (with --annotations) and/or "
                         "MSRVTT_JSFUSION_test.csv")
    if train_csv is not None and not annotations:
        raise InputError(f"{Path(train_csv).name} lists video ids only: give the captions with --annotations "
                         "(train_val_videodatainfo.json and test_videodatainfo.json, or MSRVTT_data.json)")
    with Conversion("msrvtt_retrieval", "video_retrieval", output, video_root, **settings) as run:
        if train_csv is not None:
            path = Path(train_csv)
            captions: dict[str, list[tuple[int, str]]] = {}
            for info in map(Path, annotations):
                for video_id, found in read_msrvtt_sentences(run, read_json(info, MSRVTT_EXPECTED), info).items():
                    captions.setdefault(video_id, []).extend(found)
            for line, row in read_csv(path, ("video_id",), "the 1k-A train list (MSRVTT_train.9k.csv)"):
                with run.record(path.name, f"line {line} (video_id {row.get('video_id')})"):
                    if run.full("train"):
                        continue
                    video_id = row["video_id"].strip()
                    if video_id not in captions:
                        raise RecordProblem(f"no sentence of {', '.join(Path(a).name for a in annotations)} has "
                                            f"video_id {video_id!r}", UNMATCHED)
                    meta = {"image_id": _msrvtt_number(video_id), "video_id": video_id, "source": "msrvtt"}
                    media = run.video(f"{video_id}.{video_ext}")
                    run.write("train", caption_samples("train", video_id, media, captions[video_id], meta), video_id)
        if test_csv is not None:
            path = Path(test_csv)
            expected = "the JSFusion 1k test pairs (MSRVTT_JSFUSION_test.csv)"
            for line, row in read_csv(path, JSFUSION_COLUMNS, expected):
                with run.record(path.name, f"line {line} (key {row.get('key')})"):
                    if run.full("test"):
                        continue
                    video_id, sentence = row["video_id"].strip(), (row["sentence"] or "").strip()
                    if not sentence:
                        raise RecordProblem("'sentence' is blank")
                    meta = {"image_id": _msrvtt_number(video_id), "video_id": video_id, "source": "msrvtt",
                            "jsfusion_key": row["key"]}
                    media = run.video(f"{video_id}.{video_ext}")
                    run.write("test", caption_samples("test", video_id, media, [(0, sentence)], meta), video_id)
        return run.finish()


def read_csv(path: Path, columns: Sequence[str], expected: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with at least `columns`; InputError when it has not."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error}); expected {expected}") from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path} has no column {', '.join(missing)} (its columns: {reader.fieldnames}); "
                             f"expected {expected} with columns {', '.join(columns)}")
        for row in reader:
            yield reader.line_num, row


def _msrvtt_number(video_id: str) -> int:
    """'video7579' -> 7579: the integer id retrieval uses to tell one video's captions apart."""
    if not video_id.startswith("video") or not video_id[5:].isdigit():
        raise RecordProblem(f"video_id {video_id!r} is not 'videoN'")
    return int(video_id[5:])


def convert_msrvtt_qa(
    output: str | Path,
    video_root: Any,
    *,
    train: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
    video_ext: str = "mp4",
    **settings: Any,
) -> ConvertReport:
    """MSRVTT-QA from `{train,val,test}_qa.json` (any of them); video_id N is `videoN`."""
    files = _qa_files(train=train, val=val, test=test)
    with Conversion("msrvtt_qa", "video_qa", output, video_root, **settings) as run:
        _convert_qa(run, files, lambda number: f"video{number}", video_ext, "msrvtt")
        return run.finish()


def convert_msvd_qa(
    mapping: str | Path,
    output: str | Path,
    video_root: Any,
    *,
    train: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
    video_ext: str = "avi",
    **settings: Any,
) -> ConvertReport:
    """MSVD-QA from `{train,val,test}_qa.json` (any of them) and `youtube_mapping.txt`."""
    files = _qa_files(train=train, val=val, test=test)
    with Conversion("msvd_qa", "video_qa", output, video_root, **settings) as run:
        names = read_mapping(run, Path(mapping))

        def video_name(number: int) -> str:
            if number not in names:
                raise RecordProblem(f"video_id {number} (vid{number}) is not in {Path(mapping).name}", UNMATCHED)
            return names[number]

        _convert_qa(run, files, video_name, video_ext, "msvd")
        return run.finish()


def convert_msvd_caption(
    descriptions: str | Path,
    output: str | Path,
    video_root: Any,
    *,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    mapping: str | Path | None = None,
    split_sizes: tuple[int, int, int] = MSVD_SPLIT_SIZES,
    video_ext: str = "avi",
    **settings: Any,
) -> ConvertReport:
    """MSVD captions from `AllVideoDescriptions.txt`, split by list files or by the standard order."""
    lists = {split: Path(p) for split, p in zip(SPLIT_NAMES, (train_list, val_list, test_list), strict=True) if p}
    path = Path(descriptions)
    with Conversion("msvd_caption", "video_caption", output, video_root, **settings) as run:
        captions = read_descriptions(run, path)
        if lists:
            assigned = _listed_splits(run, lists, captions, path.name)
        else:
            order = _standard_order(run, captions, path.name, mapping)
            assigned = _ordered_splits(run, order, split_sizes, path.name)
        for split, name in assigned:
            with run.record(path.name, f"video {name}"):
                if run.full(split):
                    continue
                meta = {"video_id": name, "source": "msvd"}
                media = run.video(f"{name}.{video_ext}")
                numbered_captions = list(enumerate(captions[name]))
                run.write(split, caption_samples(split, name, media, numbered_captions, meta), name)
        return run.finish()


def read_mapping(run: Conversion, path: Path) -> dict[int, str]:
    """`youtube_mapping.txt`: vid number -> youtube name; a malformed line is a problem."""
    names: dict[int, str] = {}
    for number, line in enumerate(_lines(path, "youtube_mapping.txt lines 'youtube_name vidN'"), 1):
        if not line.strip():
            continue
        with run.record(path.name, f"line {number}"):
            parts = line.split()
            if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
                raise RecordProblem(f"{line.strip()!r} is not 'youtube_name vidN'")
            names[int(parts[1][3:])] = parts[0]
    return names


def read_descriptions(run: Conversion, path: Path) -> dict[str, list[str]]:
    """`AllVideoDescriptions.txt`: youtube name -> its captions, videos in order of first appearance."""
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_lines(path, "AllVideoDescriptions.txt lines 'youtube_name caption words'"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        with run.record(path.name, f"line {number}"):
            name, _, caption = line.partition(" ")
            if not caption.strip():
                raise RecordProblem(f"{line!r} has a video name but no caption; expected 'youtube_name caption words'")
            captions.setdefault(name, []).append(caption.strip())
    return captions


def _lines(path: Path, expected: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; expected {expected}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error}); expected {expected}") from None


def _listed_splits(
    run: Conversion, lists: dict[str, Path], captions: dict[str, list[str]], descriptions: str
) -> list[tuple[str, str]]:
    """(split, video) for every video of the split list files that has descriptions."""
    assigned = []
    for split, path in lists.items():
        for number, line in enumerate(_lines(path, f"the {split} list of MSVD video names, one a line"), 1):
            name = line.strip()
            if not name:
                continue
            with run.record(path.name, f"line {number} ({name})"):
                if name not in captions:
                    raise RecordProblem(f"video {name} has no descriptions in {descriptions}", UNMATCHED)
                assigned.append((split, name))
    return assigned


def _standard_order(
    run: Conversion, captions: dict[str, list[str]], descriptions: str, mapping: str | Path | None
) -> list[str]:
    """The videos in vid1..vidN order of the mapping file, or in order of appearance without one."""
    if mapping is None:
        return list(captions)
    numbered = read_mapping(run, Path(mapping))
    order = [numbered[n] for n in sorted(numbered) if numbered[n] in captions]
    for name in sorted(set(captions) - set(order)):
        with run.record(descriptions, f"video {name}"):
            raise RecordProblem(f"video {name} is not in {Path(mapping).name}, which orders the standard split", UNMATCHED)
    return order


def _ordered_splits(
    run: Conversion, order: list[str], split_sizes: Sequence[int], descriptions: str
) -> list[tuple[str, str]]:
    """The first split_sizes[0] videos to train, the next split_sizes[1] to val, the rest to test."""
    assigned = []
    start = 0
    for split, size in zip(SPLIT_NAMES, split_sizes, strict=True):
        assigned += [(split, name) for name in order[start:start + size]]
        start += size
    for name in order[start:]:
        with run.record(descriptions, f"video {name}"):
            raise RecordProblem(f"video {name} lies beyond the {start} videos of the split sizes {tuple(split_sizes)}", UNMATCHED)
    return assigned


def _qa_files(**files: str | Path | None) -> dict[str, Path]:
    given = {split: Path(path) for split, path in files.items() if path is not None}
    if not given:
        raise InputError("no QA file given; expected at least one of train, val, test ({split}_qa.json)")
    return given


def _convert_qa(
    run: Conversion, files: dict[str, Path], video_name: Callable[[int], str], video_ext: str, source: str
) -> None:
    for split, path in files.items():
        for position, record in enumerate(top_list(read_json(path, QA_EXPECTED), None, path, QA_EXPECTED)):
            with run.record(path.name, label("", position, record, "id")):
                if run.full(split):
                    continue
                question_id = need(record, "id", int)
                question = need(record, "question", str).strip()
                answer = need(record, "answer", str).strip()
                video_id = video_name(need(record, "video_id", int))
                meta = {"question_id": question_id, "video_id": video_id, "question": question,
                        "answers": [answer], "weights": [1.0], "source": source}
                media = run.video(f"{video_id}.{video_ext}")
                run.write(split, [Sample(str(question_id), *media, question, meta)], question_id)
