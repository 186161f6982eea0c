"""RefCOCO, RefCOCO+ and RefCOCOg (refs pickle + COCO instances.json) -> visual grounding shards.

Inputs, as released with the `refer` toolkit:

- `refs(unc).p` (RefCOCO, RefCOCO+), `refs(umd).p` or `refs(google).p` (RefCOCOg): a pickled
  list of {"ref_id", "ann_id", "image_id", "split": "train|val|testA|testB|test", "category_id",
  "sentences": [{"sent", "raw", "tokens", "sent_id"}], "file_name"}. The pickle is read with an
  unpickler that builds only plain lists, dicts, strings and numbers, so a file that would run
  code is refused instead.
- `instances.json` beside it, COCO's detection format: {"images": [{"id", "file_name", "width",
  "height"}], "annotations": [{"id", "image_id", "bbox": [x, y, w, h], "category_id"}],
  "categories": [{"id", "name"}]}. The ref's own `file_name` carries an annotation suffix
  (`..._581857_1.jpg`) and names no real file: the image is `ROOT/<images entry file_name>`.

One sample per sentence, key `REFID_SENTID`, txt = the sentence (`sent`, the released lower-cased
form). Task fields in KEY.json: ref_id, ann_id, image_id, sentence, sent_id, box ([x, y, w, h] in
pixels of the original image, which is copied unchanged), image_size ([w, h]), category (its
name, None without categories), category_id, source. splits.json lists ref ids; the splits keep
their released names (testA/testB for RefCOCO and RefCOCO+, test for RefCOCOg umd).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from data_prep.convert.common import Conversion, read_json, sentences, top_list
from data_prep.convert.report import (
    UNMATCHED,
    ConvertReport,
    InputError,
    RecordProblem,
    label,
    need,
)
from data_prep.shard_writer import Sample

DATASETS = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p or refs(google).p"}
INSTANCES_EXPECTED = ('COCO instances {"images": [{"id", "file_name", "width", "height"}], '
                      '"annotations": [{"id", "image_id", "bbox"}], "categories": [{"id", "name"}]}')


class _PlainUnpickler(pickle.Unpickler):
    """Builds only the built-in containers and scalars; any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and a refs file holds only plain data")


def load_refs(path: str | Path, dataset: str = "refcoco") -> list[Any]:
    """The list of refs in a refs pickle; an `InputError` when it is no such pickle."""
    path = Path(path)
    expected = f"the {dataset} refs pickle {DATASETS.get(dataset, 'refs(...).p')}: a list of refs"
    try:
        with path.open("rb") as handle:
            refs = _PlainUnpickler(handle, encoding="utf-8").load()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; expected {expected}") from None
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError) as error:
        raise InputError(f"{path} cannot be unpickled ({error}); expected {expected}") from None
    if not isinstance(refs, list):
        raise InputError(f"{path} holds a {type(refs).__name__}; expected {expected}")
    return refs


def convert_refcoco(
    refs: str | Path,
    instances: str | Path,
    output: str | Path,
    image_root: Any,
    *,
    dataset: str = "refcoco",
    **settings: Any,
) -> ConvertReport:
    """Convert one refs pickle of `dataset` (refcoco, refcoco+ or refcocog) with its instances.json.

    `settings` go to `Conversion`: strict, shard_size, limit, max_problems.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    refs_path, instances_path = Path(refs), Path(instances)
    records = load_refs(refs_path, dataset)
    payload = read_json(instances_path, INSTANCES_EXPECTED)
    with Conversion(dataset, "grounding", output, image_root, **settings) as run:
        images = _index(run, instances_path, top_list(payload, "images", instances_path, INSTANCES_EXPECTED), "images")
        boxes = _index(run, instances_path, top_list(payload, "annotations", instances_path, INSTANCES_EXPECTED), "annotations")
        categories = {c.get("id"): c.get("name") for c in payload.get("categories") or [] if isinstance(c, dict)}
        for position, ref in enumerate(records):
            with run.record(refs_path.name, label("refs", position, ref, "ref_id")):
                split = need(ref, "split", str)
                if run.full(split):
                    continue
                ref_id = need(ref, "ref_id", int)
                ann_id = need(ref, "ann_id", int)
                image_id = need(ref, "image_id", int)
                category_id = need(ref, "category_id", int)
                box = _box(boxes, ann_id, image_id, instances_path.name)
                file_name, image_size = _image_entry(images, image_id, instances_path.name)
                meta = {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "box": box, "image_size": image_size,
                        "category": categories.get(category_id), "category_id": category_id, "source": dataset}
                texts = sentences(need(ref, "sentences", list, non_empty=True), "sent_id", "sent")
                media = run.image(file_name)
                samples = [Sample(f"{ref_id}_{sent_id}", *media, text, {**meta, "sentence": text, "sent_id": sent_id})
                           for sent_id, text in texts]
                run.write(split, samples, ref_id)
        return run.finish()


def _index(run: Conversion, path: Path, records: list[Any], collection: str) -> dict[int, dict]:
    """id -> record of an instances.json list; records without an integer id are problems."""
    index: dict[int, dict] = {}
    for position, record in enumerate(records):
        with run.record(path.name, label(collection, position, record, "id")):
            index[need(record, "id", int)] = record
    return index


def _box(boxes: dict[int, dict], ann_id: int, image_id: int, file: str) -> list[float]:
    annotation = boxes.get(ann_id)
    if annotation is None:
        raise RecordProblem(f"ann_id {ann_id} is not among the annotations of {file}", UNMATCHED)
    if annotation.get("image_id") != image_id:
        raise RecordProblem(f"annotation {ann_id} of {file} is on image {annotation.get('image_id')}, the ref on {image_id}")
    box = annotation.get("bbox")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or box[2] < 0 or box[3] < 0):
        raise RecordProblem(f"annotation {ann_id} of {file} has bbox {box!r}; expected [x, y, w, h] with w, h >= 0")
    return [float(v) for v in box]


def _image_entry(images: dict[int, dict], image_id: int, file: str) -> tuple[str, list[int]]:
    """The image's file name and [width, height] from instances.json."""
    image = images.get(image_id)
    if image is None:
        raise RecordProblem(f"image_id {image_id} is not among the images of {file}", UNMATCHED)
    try:
        return need(image, "file_name", str), [need(image, "width", int), need(image, "height", int)]
    except RecordProblem as problem:
        raise RecordProblem(f"image {image_id} of {file}: {problem.message}") from None

