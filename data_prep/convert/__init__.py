"""Converters from the official annotation formats of the fine-tuning datasets into shards.

Each converter reads one dataset family's released files and writes `OUTPUT/<split>/*.tar`
(`KEY.jpg|mp4`, `KEY.txt`, `KEY.json` with the task fields), a manifest per split,
`OUTPUT/splits.json` and `OUTPUT/report.json` (see `common.py`); `webvid` writes URL lists for
`mplug data download-videos` instead of shards. `CONVERTERS` maps each FORMAT
name of `mplug data convert FORMAT` to its function and the file options it takes; every function
returns a `ConvertReport`.

    from data_prep.convert import convert_coco_karpathy
    report = convert_coco_karpathy("dataset_coco.json", "shards/coco", "images/coco", limit=100)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from data_prep.convert.karpathy import convert_coco_karpathy, convert_flickr30k, convert_karpathy
from data_prep.convert.refcoco import convert_refcoco
from data_prep.convert.report import ConversionError, ConvertReport, InputError, Problem
from data_prep.convert.video import (
    convert_msrvtt_caption,
    convert_msrvtt_qa,
    convert_msrvtt_retrieval,
    convert_msvd_caption,
    convert_msvd_qa,
)
from data_prep.convert.vqa import DEFAULT_IMAGE_PATTERN, DEFAULT_VG_IMAGE_PATTERN, convert_vqa_v2
from data_prep.convert.webvid import convert_webvid

__all__ = [
    "CONVERTERS", "ConversionError", "ConvertReport", "Converter", "InputError", "Option", "Problem",
    "convert_coco_karpathy", "convert_flickr30k", "convert_karpathy", "convert_msrvtt_caption",
    "convert_msrvtt_qa", "convert_msrvtt_retrieval", "convert_msvd_caption", "convert_msvd_qa", "convert_refcoco",
    "convert_vqa_v2", "convert_webvid",
]


@dataclass(frozen=True)
class Option:
    """A format-specific command-line option; its `dest` is the converter's keyword argument."""

    flag: str
    help: str
    required: bool = False
    many: bool = False  # may be given several times; the converter gets a list
    is_path: bool = True
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Converter:
    name: str
    function: Callable[..., ConvertReport]
    help: str
    options: tuple[Option, ...]
    media: str | None = "image"  # the media root is passed as `{media}_root`; None: the format has no media
    output_help: str | None = None  # what OUTPUT holds, when not split shards


def _qa_files() -> tuple[Option, ...]:
    return tuple(Option(f"--{split}", f"{split}_qa.json, the {split} questions") for split in ("train", "val", "test"))


def _video_ext(default: str) -> Option:
    return Option("--video-ext", f"extension of the video files to look for (default {default})",
                  is_path=False, default=default)


_REFS = (
    Option("--refs", "the refs pickle: refs(unc).p for RefCOCO/RefCOCO+, refs(umd).p or refs(google).p for RefCOCOg",
           required=True),
    Option("--instances", "the instances.json beside it (COCO detection format)", required=True),
)
_KARPATHY_HELP = "Karpathy split file; restval images go into train (the Karpathy convention)"

CONVERTERS: dict[str, Converter] = {c.name: c for c in (
    Converter("coco_karpathy", convert_coco_karpathy,
              "COCO captions, Karpathy split; restval goes into train; images ROOT/filepath/filename",
              (Option("--annotations", f"dataset_coco.json, the {_KARPATHY_HELP}", required=True),)),
    Converter("flickr30k", convert_flickr30k,
              "Flickr30K captions, Karpathy split; images ROOT/filename",
              (Option("--annotations", f"dataset_flickr30k.json, the {_KARPATHY_HELP}", required=True),)),
    Converter("vqa_v2", convert_vqa_v2,
              "VQA v2 questions with their annotations, optionally Visual Genome QA into train", (
                  Option("--questions", "v2_OpenEnded_mscoco_<subtype>_questions.json (repeat for each subtype)",
                         required=True, many=True),
                  Option("--annotations", "v2_mscoco_<subtype>_annotations.json for train/val questions (repeatable)",
                         many=True),
                  Option("--vg-qa", "Visual Genome question_answers.json; its samples join train with source 'vg'"),
                  Option("--image-pattern", "VQA image path under a root, formatted with subtype and image_id "
                         f"(default {DEFAULT_IMAGE_PATTERN})", is_path=False, default=DEFAULT_IMAGE_PATTERN),
                  Option("--vg-image-pattern", "VG image path under a root, formatted with image_id "
                         f"(default {DEFAULT_VG_IMAGE_PATTERN})", is_path=False, default=DEFAULT_VG_IMAGE_PATTERN),
              )),
    Converter("refcoco", partial(convert_refcoco, dataset="refcoco"), "RefCOCO referring expressions", _REFS),
    Converter("refcoco+", partial(convert_refcoco, dataset="refcoco+"), "RefCOCO+ referring expressions", _REFS),
    Converter("refcocog", partial(convert_refcoco, dataset="refcocog"), "RefCOCOg referring expressions", _REFS),
    Converter("msrvtt_caption", convert_msrvtt_caption, "MSRVTT captions; videos ROOT/videoN.mp4", (
        Option("--annotations", "train_val_videodatainfo.json and/or test_videodatainfo.json", required=True,
               many=True),
        _video_ext("mp4"),
    ), media="video"),
    Converter("msrvtt_qa", convert_msrvtt_qa, "MSRVTT-QA; videos ROOT/videoN.mp4",
              (*_qa_files(), _video_ext("mp4")), media="video"),
    Converter("msrvtt_retrieval", convert_msrvtt_retrieval,
              "MSRVTT text-video retrieval, 1k-A split (JSFusion test); videos ROOT/videoN.mp4", (
                  Option("--train-csv", "MSRVTT_train.9k.csv, the train video ids"),
                  Option("--annotations", "videodatainfo files with the train videos' captions "
                         "(train_val_ and test_videodatainfo.json, or MSRVTT_data.json)", many=True),
                  Option("--test-csv", "MSRVTT_JSFUSION_test.csv, the 1,000 test video-sentence pairs"),
                  _video_ext("mp4"),
              ), media="video"),
    Converter("msvd_caption", convert_msvd_caption,
              "MSVD captions; split lists, or the standard 1200/100/670 split by order", (
                  Option("--descriptions", "AllVideoDescriptions.txt", required=True),
                  Option("--train-list", "train video names, one a line"),
                  Option("--val-list", "val video names, one a line"),
                  Option("--test-list", "test video names, one a line"),
                  Option("--mapping", "youtube_mapping.txt: orders the standard split by vid number"),
                  _video_ext("avi"),
              ), media="video"),
    Converter("msvd_qa", convert_msvd_qa, "MSVD-QA; videos ROOT/<youtube name>.avi via youtube_mapping.txt", (
        Option("--mapping", "youtube_mapping.txt ('youtube_name vidN' lines)", required=True),
        *_qa_files(),
        _video_ext("avi"),
    ), media="video"),
    Converter("webvid", convert_webvid,
              "WebVid-2M/10M CSVs to URL lists for `mplug data download-videos`", (
                  Option("--train", "results_2M_train.csv or results_10M_train.csv (repeatable)", many=True),
                  Option("--val", "results_2M_val.csv or results_10M_val.csv (repeatable)", many=True),
                  Option("--val-fraction", "without --val: this share of the train rows (by a hash of the "
                         "videoid) goes to val", is_path=False),
              ), media=None,
              output_help="writes OUTPUT/{train,val}.parquet (url, caption, key, duration, page_dir), "
                          "OUTPUT/splits.json, OUTPUT/report.json"),
)}
