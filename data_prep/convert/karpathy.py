"""COCO captions and Flickr30K in Karpathy's split files -> caption / retrieval shards.

Input: `dataset_coco.json` or `dataset_flickr30k.json`,

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "imgid": 0, "split": "train|restval|val|test", "sentids": [...], "cocoid": 391895,
      "sentences": [{"tokens": [...], "raw": "A man ...", "imgid": 0, "sentid": 0}]}]}

COCO images are `ROOT/filepath/filename` and are identified by `cocoid` (the id the COCO caption
evaluation uses); Flickr30K entries have no `filepath` (`ROOT/filename`) and no `cocoid`, and are
identified by `imgid`. Karpathy's `restval` images (the rest of COCO val2014) go into `train`, as
in every paper that uses this split: 113,287 train, 5,000 val, 5,000 test images for COCO;
29,000 / 1,014 / 1,000 for Flickr30K.

Layout: in `train` one sample per (image, caption), key `IMAGEID_SENTID`, txt = that caption;
in `val` and `test` one sample per image, key `IMAGEID`, txt = its first caption, because the
evaluation unit is the image (caption metrics and retrieval both score against all references).
Task fields in KEY.json: image_id, captions (all reference captions of the image), split, source,
and sent_id on train samples. Captions are the `raw` sentences, stripped; cleaning them for the
tokenizer is the loader's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.convert.common import Conversion, caption_samples, read_json, sentences, top_list
from data_prep.convert.report import ConvertReport, InputError, RecordProblem, label, need

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
EXPECTED = ('Karpathy\'s split file {"dataset": "coco", "images": [{"filename": ..., "split": ..., '
            '"sentences": [{"raw": ..., "sentid": ...}]}]}')


def convert_karpathy(
    annotations: str | Path, output: str | Path, image_root: Any, *, dataset: str, **settings: Any
) -> ConvertReport:
    """Convert a Karpathy split file of `dataset` ('coco' or 'flickr30k').

    `settings` go to `Conversion`: strict, shard_size, limit, max_problems.
    """
    if dataset not in ("coco", "flickr30k"):
        raise ValueError(f"dataset must be 'coco' or 'flickr30k', got {dataset!r}")
    path = Path(annotations)
    payload = read_json(path, EXPECTED)
    images = top_list(payload, "images", path, EXPECTED)
    declared = payload.get("dataset")
    if declared is not None and declared != dataset:
        other = "coco_karpathy" if declared == "coco" else declared
        raise InputError(f"{path} says dataset {declared!r} but this converter reads {dataset!r}; use FORMAT {other}")
    format_name = "coco_karpathy" if dataset == "coco" else "flickr30k"
    id_key = "cocoid" if dataset == "coco" else "imgid"
    with Conversion(format_name, "caption", output, image_root, **settings) as run:
        for index, entry in enumerate(images):
            with run.record(path.name, label("images", index, entry, id_key)):
                split = _split(entry)
                if run.full(split):
                    continue
                image_id = need(entry, id_key, int)
                relative = need(entry, "filename", str)
                if dataset == "coco":
                    relative = f"{need(entry, 'filepath', str)}/{relative}"
                captions = sentences(need(entry, "sentences", list, non_empty=True), "sentid", "raw")
                meta = {"image_id": image_id, "source": dataset}
                samples = caption_samples(split, str(image_id), run.image(relative), captions, meta)
                run.write(split, samples, image_id)
        return run.finish()


def convert_coco_karpathy(annotations: str | Path, output: str | Path, image_root: Any, **settings: Any) -> ConvertReport:
    """COCO captions, Karpathy split (`dataset_coco.json`); images under ROOT/val2014, ROOT/train2014."""
    return convert_karpathy(annotations, output, image_root, dataset="coco", **settings)


def convert_flickr30k(annotations: str | Path, output: str | Path, image_root: Any, **settings: Any) -> ConvertReport:
    """Flickr30K, Karpathy split (`dataset_flickr30k.json`); images directly under ROOT."""
    return convert_karpathy(annotations, output, image_root, dataset="flickr30k", **settings)


def _split(entry: Any) -> str:
    split = need(entry, "split", str)
    if split not in KARPATHY_SPLITS:
        raise RecordProblem(f"split {split!r} is not one of {sorted(KARPATHY_SPLITS)}")
    return KARPATHY_SPLITS[split]

