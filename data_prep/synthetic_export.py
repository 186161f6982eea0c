"""A synthetic data set on disk: images in COCO's layout, a URL list to download them from, and
the annotation files of Karpathy's caption splits, VQA v2 and RefCOCO in their official formats.

    DIR/images/train2014/COCO_train2014_000000000001.jpg   train scenes
    DIR/images/val2014/COCO_val2014_000000000009.jpg       val and test scenes, where COCO keeps them
    DIR/urls.parquet, DIR/urls.csv                          url, caption, path (relative to DIR)
    DIR/annotations/dataset_coco.json                       Karpathy's COCO splits, five captions an image
    DIR/annotations/dataset_flickr30k.json                  the same captions as Karpathy's Flickr30K file
    DIR/annotations/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    DIR/annotations/v2_mscoco_{train,val}2014_annotations.json
    DIR/annotations/answer_list.json                        every answer, for ranking
    DIR/annotations/refcoco/refs(unc).p, instances.json     referring expressions and their boxes
    DIR/synthetic.json                                      seed, sizes and counts of this run

Image ids run 1..N; the first 80% of scenes are train, then 10% val, then 10% test. The same
seed writes byte-identical files. Scene n is scene n of `make_scenes(N, seed, image_size)`.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.shard_writer import encode_jpeg
from data_prep.synthetic import SHAPES, Shape, caption_variants, make_scene
from data_prep.synthetic_tasks import (
    Question,
    Referral,
    answer_vocabulary,
    make_questions,
    make_referrals,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SPLIT_SHARES = {"val": 0.1, "test": 0.1}  # the rest is train
CAPTIONS_PER_IMAGE = 5
MIN_IMAGE_SIZE = 32  # below this the smallest shapes are a handful of pixels
PICKLE_PROTOCOL = 4  # fixed, so the same seed writes the same bytes on every Python
CIRCLE_POLYGON_POINTS = 16
URL_COLUMNS = ("url", "caption", "path")
CATEGORY_IDS = {kind: index + 1 for index, kind in enumerate(SHAPES)}


@dataclass
class SceneRecord:
    """What is written about one scene; the image itself is written at once and not kept."""

    image_id: int
    split: str  # train | val | test
    shapes: list[Shape]
    captions: list[str]
    questions: list[Question]
    referrals: list[Referral]

    @property
    def subset(self) -> str:
        return "train2014" if self.split == "train" else "val2014"

    @property
    def file_name(self) -> str:
        return f"COCO_{self.subset}_{self.image_id:012d}.jpg"

    @property
    def image_path(self) -> str:
        """Relative to DIR/images, as the Flickr30K file and RefCOCO's instances name images."""
        return f"{self.subset}/{self.file_name}"


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a written synthetic data set lies, and how much of each kind it holds."""

    root: Path
    seed: int
    image_size: int
    base_url: str
    splits: dict[str, int]
    num_captions: int
    num_questions: int
    num_referrals: int

    @property
    def num_samples(self) -> int:
        return sum(self.splits.values())

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def annotations_dir(self) -> Path:
        return self.root / "annotations"

    @property
    def urls_parquet(self) -> Path:
        return self.root / "urls.parquet"

    @property
    def urls_csv(self) -> Path:
        return self.root / "urls.csv"

    @property
    def karpathy_coco(self) -> Path:
        return self.annotations_dir / "dataset_coco.json"

    @property
    def karpathy_flickr30k(self) -> Path:
        return self.annotations_dir / "dataset_flickr30k.json"

    def vqa_questions(self, subset: str) -> Path:
        return self.annotations_dir / f"v2_OpenEnded_mscoco_{subset}_questions.json"

    def vqa_annotations(self, subset: str) -> Path:
        return self.annotations_dir / f"v2_mscoco_{subset}_annotations.json"

    @property
    def answer_list(self) -> Path:
        return self.annotations_dir / "answer_list.json"

    @property
    def refcoco_refs(self) -> Path:
        return self.annotations_dir / "refcoco" / "refs(unc).p"

    @property
    def refcoco_instances(self) -> Path:
        return self.annotations_dir / "refcoco" / "instances.json"

    @property
    def parameters_file(self) -> Path:
        return self.root / "synthetic.json"


def split_counts(num_samples: int) -> dict[str, int]:
    """Scenes per Karpathy split: 10% val and 10% test (at least one each from three scenes on)."""
    held_out = {
        split: max(1, round(num_samples * share)) if num_samples >= 3 else 0
        for split, share in SPLIT_SHARES.items()
    }
    return {"train": num_samples - sum(held_out.values()), **held_out}


def sentence_tokens(text: str) -> list[str]:
    """Lowercased words without punctuation, as Karpathy's and RefCOCO's files tokenise."""
    return re.findall(r"[a-z0-9]+", text.lower())


def raw_sentence(caption: str) -> str:
    """A caption as an annotator wrote it: capitalised, with a full stop."""
    return caption[0].upper() + caption[1:] + "."


def karpathy_json(records: list[SceneRecord], dataset: str) -> dict[str, Any]:
    """Karpathy's `dataset_coco.json` (dataset="coco") or `dataset_flickr30k.json` (dataset="flickr30k")."""
    images, sentid = [], 0
    for imgid, record in enumerate(records):
        sentences = []
        for caption in record.captions:
            sentences.append({"tokens": sentence_tokens(caption), "raw": raw_sentence(caption),
                              "imgid": imgid, "sentid": sentid})
            sentid += 1
        entry: dict[str, Any] = {"sentids": [s["sentid"] for s in sentences], "imgid": imgid,
                                 "sentences": sentences, "split": record.split}
        if dataset == "coco":
            entry.update(filepath=record.subset, filename=record.file_name, cocoid=record.image_id)
        else:
            entry.update(filename=record.image_path)
        images.append(entry)
    return {"images": images, "dataset": dataset}


def question_id(image_id: int, index: int) -> int:
    """VQA v2 numbers an image's questions image_id * 1000 + 0, 1, 2, ..."""
    return image_id * 1000 + index


def vqa_json(records: list[SceneRecord], subset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The questions file and the annotations file of VQA v2 for `subset` (train2014 or val2014)."""
    info = {"description": "synthetic coloured shapes in the format of VQA v2", "version": "2.0"}
    questions, annotations = [], []
    for record in (r for r in records if r.subset == subset):
        for index, question in enumerate(record.questions):
            qid = question_id(record.image_id, index)
            questions.append({"image_id": record.image_id, "question": question.text, "question_id": qid})
            answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                       for i, a in enumerate(question.answers)]
            annotations.append({"question_type": question.question_type,
                                "multiple_choice_answer": question.answer, "answers": answers,
                                "image_id": record.image_id, "answer_type": question.answer_type,
                                "question_id": qid})
    common = {"info": info, "data_type": "mscoco", "data_subtype": subset}
    return ({**common, "task_type": "Open-Ended", "questions": questions},
            {**common, "annotations": annotations})


def refcoco_split(record: SceneRecord) -> str:
    """Train and val scenes keep their split; test scenes alternate between testA and testB."""
    if record.split != "test":
        return record.split
    return "testA" if record.image_id % 2 == 0 else "testB"


def segmentation(shape: Shape) -> list[list[float]]:
    """The drawn outline as one COCO polygon [x1, y1, x2, y2, ...]."""
    x0, y0, x1, y1 = shape.box
    if shape.kind == "square":
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif shape.kind == "triangle":
        points = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    else:
        (cx, cy), radius = shape.centre, (x1 - x0) / 2
        angles = (2 * math.pi * i / CIRCLE_POLYGON_POINTS for i in range(CIRCLE_POLYGON_POINTS))
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
    return [[round(v, 2) for point in points for v in point]]


def refcoco_files(records: list[SceneRecord], image_size: int) -> tuple[list[dict], dict[str, Any]]:
    """RefCOCO's `refs(unc).p` list and its `instances.json` (COCO detection format), one
    annotation and one ref per shape; ids of refs, annotations and sentences count from 1."""
    refs, images, annotations = [], [], []
    sent_id = 0
    for record in records:
        images.append({"id": record.image_id, "file_name": record.image_path,
                       "width": image_size, "height": image_size})
        for referral in record.referrals:
            shape = record.shapes[referral.shape_index]
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": record.image_id, "bbox": shape.coco_box(),
                                "category_id": CATEGORY_IDS[shape.kind], "area": round(shape.area, 2),
                                "iscrowd": 0, "segmentation": segmentation(shape)})
            sentences = []
            for text in referral.sentences:
                sent_id += 1
                sentences.append({"sent": text.lower(), "raw": text, "tokens": sentence_tokens(text),
                                  "sent_id": sent_id})
            refs.append({"ref_id": len(refs) + 1, "ann_id": ann_id, "image_id": record.image_id,
                         "split": refcoco_split(record), "sentences": sentences,
                         "sent_ids": [s["sent_id"] for s in sentences],
                         "category_id": CATEGORY_IDS[shape.kind], "file_name": record.image_path})
    categories = [{"id": i, "name": kind, "supercategory": "shape"} for kind, i in CATEGORY_IDS.items()]
    return refs, {"images": images, "annotations": annotations, "categories": categories}


def _check_base_url(base_url: str) -> str:
    if not re.match(r"^https?://[^/]+", base_url):
        raise ValueError(f"base URL {base_url!r} is not an http(s) address; expected e.g. {DEFAULT_BASE_URL}")
    return base_url.rstrip("/")


def _write_url_files(root: Path, paths: list[str], captions: list[str], base_url: str) -> None:
    urls = [f"{base_url}/{path}" for path in paths]
    table = pa.table({"url": urls, "caption": captions, "path": paths})
    pq.write_table(table, root / "urls.parquet")
    with (root / "urls.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(URL_COLUMNS)
        writer.writerows(zip(urls, captions, paths, strict=True))


def write_url_list(output_dir: str | Path, base_url: str) -> Path:
    """Point `urls.parquet` and `urls.csv` of a written data set at `base_url` (a server's new port);
    returns the parquet path. `synthetic.json` records the new base URL."""
    root = Path(output_dir)
    base_url = _check_base_url(base_url)
    parquet = root / "urls.parquet"
    if not parquet.is_file():
        raise FileNotFoundError(f"{parquet} does not exist; write the data set first with write_synthetic")
    table = pq.read_table(parquet)
    missing = [c for c in ("caption", "path") if c not in table.column_names]
    if missing:
        raise ValueError(f"{parquet} lacks the columns {missing}; expected {list(URL_COLUMNS)}")
    _write_url_files(root, table.column("path").to_pylist(), table.column("caption").to_pylist(), base_url)
    parameters = root / "synthetic.json"
    if parameters.is_file():
        payload = json.loads(parameters.read_text())
        payload["base_url"] = base_url
        _write_json(parameters, payload, indent=2)
    return parquet


def _write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n", encoding="utf-8")


def _scene_records(root: Path, num_samples: int, seed: int, image_size: int) -> list[SceneRecord]:
    """Draw the scenes, write their images, and keep their shapes and texts."""
    scene_rng = random.Random(seed)
    splits = [split for split, count in split_counts(num_samples).items() for _ in range(count)]
    records = []
    for position, split in enumerate(splits):
        scene = make_scene(scene_rng, image_size)
        image_id = position + 1
        # Texts draw from their own stream per image, so scenes stay those of make_scenes(seed).
        text_rng = random.Random(f"synthetic-texts:{seed}:{image_id}")
        record = SceneRecord(image_id, split, scene.shapes, caption_variants(scene, text_rng, CAPTIONS_PER_IMAGE),
                             make_questions(scene, text_rng), make_referrals(scene, text_rng))
        path = root / "images" / record.image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(scene.image))
        records.append(record)
    return records


def write_synthetic(output_dir: str | Path, num_samples: int, seed: int = 0, image_size: int = 128,
                    base_url: str = DEFAULT_BASE_URL) -> SyntheticDataset:
    """Write `num_samples` synthetic scenes with captions, questions and referring expressions."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    base_url = _check_base_url(base_url)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    records = _scene_records(root, num_samples, seed, image_size)
    dataset = SyntheticDataset(
        root=root, seed=seed, image_size=image_size, base_url=base_url, splits=split_counts(num_samples),
        num_captions=sum(len(r.captions) for r in records),
        num_questions=sum(len(r.questions) for r in records),
        num_referrals=sum(len(r.referrals) for r in records),
    )
    _write_url_files(root, [f"images/{r.image_path}" for r in records], [r.captions[0] for r in records], base_url)
    _write_json(dataset.karpathy_coco, karpathy_json(records, "coco"))
    _write_json(dataset.karpathy_flickr30k, karpathy_json(records, "flickr30k"))
    for subset in ("train2014", "val2014"):
        questions, annotations = vqa_json(records, subset)
        _write_json(dataset.vqa_questions(subset), questions)
        _write_json(dataset.vqa_annotations(subset), annotations)
    _write_json(dataset.answer_list, answer_vocabulary())
    refs, instances = refcoco_files(records, image_size)
    dataset.refcoco_refs.parent.mkdir(parents=True, exist_ok=True)
    dataset.refcoco_refs.write_bytes(pickle.dumps(refs, protocol=PICKLE_PROTOCOL))
    _write_json(dataset.refcoco_instances, instances)
    _write_json(dataset.parameters_file, {
        "seed": seed, "num_samples": num_samples, "image_size": image_size, "base_url": base_url,
        "splits": dataset.splits, "captions": dataset.num_captions, "questions": dataset.num_questions,
        "referrals": dataset.num_referrals,
    }, indent=2)
    return dataset
