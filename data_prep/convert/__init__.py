"""Converters from the official annotation formats of the fine-tuning datasets into shards.

Each converter reads one dataset family's released files and writes `OUTPUT/<split>/*.tar`
(`KEY.jpg|mp4`, `KEY.txt`, `KEY.json` with the task fields), a manifest per split,
`OUTPUT/splits.json` and `OUTPUT/report.json` (see `common.py`). `CONVERTERS` maps each FORMAT
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
    convert_msvd_caption,
    convert_msvd_qa,
)
from data_prep.convert.vqa import DEFAULT_IMAGE_PATTERN, DEFAULT_VG_IMAGE_PATTERN, convert_vqa_v2

__all__ = [
    "CONVERTERS", "ConversionError", "ConvertReport", "Converter", "InputError", "Option", "Problem",
    "convert_coco_karpathy", "convert_flickr30k", "convert_karpathy", "convert_msrvtt_caption",
    "convert_msrvtt_qa", "convert_msvd_caption", "convert_msvd_qa", "convert_refcoco", "convert_vqa_v2",
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
    media: str = "image"  # the media root is passed as `{media}_root`


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
)}
