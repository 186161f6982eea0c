"""`mplug predict`: one image through a fine-tuned model package: an answer, a caption or a box.

The package names its task (package.json `extra.task`, written by `mplug finetune`), so the
model is rebuilt as that task with the settings it was trained with. A grounding box is also
drawn on a copy of the image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from data_prep.augment import AugmentConfig, ImageAugment
from data_prep.batch import normalize, tokenize
from data_prep.image_decode import decode_rgb
from finetune.init_source import InitSourceError, resolve_init
from finetune.registry import task_class
from finetune.tasks.base import TaskModel
from pretrain.config.typed import from_dict
from pretrain.package import load_package, read_package_info

FLAG_OF_TASK = {"vqa": "--question", "caption": "--task caption", "grounding": "--expression"}
BOX_COLOUR = (255, 0, 0)
BOX_WIDTH = 3


class PredictError(ValueError):
    """The model, the image or the request do not fit together."""


def load_task_package(directory: Path) -> TaskModel:
    """The fine-tuned task model of a package written by `mplug finetune`."""
    info = read_package_info(directory)
    name = info.extra.get("task")
    if not name:
        raise PredictError(f"{directory} is a pretraining package (its package.json names no task); predict needs a "
                           "model from `mplug finetune TASK`, e.g. runs:/<finetune_run_id>/model")
    task_cls = task_class(name)
    settings = from_dict(task_cls.Settings, info.extra.get("task_settings", {}), path="task")
    package = load_package(directory, momentum=False)
    task = task_cls(package.model, settings, package.tokenizer)
    return task.eval()


def image_batch(path: Path, image_size: int) -> torch.Tensor:
    """(1, 3, S, S) normalised, resized as evaluation resizes."""
    try:
        image = decode_rgb(path.read_bytes())
    except FileNotFoundError:
        raise PredictError(f"image {path} does not exist") from None
    except Exception as exc:
        raise PredictError(f"image {path} could not be decoded ({exc}); give a JPEG, PNG or WebP file") from None
    augmented = ImageAugment(AugmentConfig.preset("eval", image_size))(image)
    return normalize(augmented.image.unsqueeze(0))


def text_batch(task: TaskModel, text: str) -> dict[str, torch.Tensor]:
    length = task.model.cfg.text.max_positions
    return tokenize(task.tokenizer, [text], min(length, 64))


@torch.no_grad()
def predict(task: TaskModel, image: Path, text: str | None) -> dict[str, Any]:
    size = task.model.cfg.vision.image_size
    batch: dict[str, Any] = {"images": image_batch(image, size), "meta": [{}], "keys": [image.stem]}
    if task.name == "caption":
        return {"caption": task.generate(batch["images"])[0]}
    if text is None:
        raise PredictError(f"the {task.name} model needs {FLAG_OF_TASK[task.name]} TEXT")
    batch.update(text_batch(task, text))
    if task.name == "vqa":
        return {"question": text, "answer": task.answer(batch)[0]}
    if task.name == "grounding":
        box = task.predict_boxes(batch)[0].tolist()  # xyxy in the resized image's pixels
        return {"expression": text, "box_xyxy": box, "image_size": size}
    raise PredictError(f"mplug predict does not serve {task.name} models; it answers vqa, caption and grounding")


def draw_box(image: Path, box_xyxy: list[float], model_size: int, output: Path) -> Path:
    """The image with the box (given in the model's resized pixels) drawn at the image's own scale."""
    from PIL import Image, ImageDraw

    picture = Image.open(image).convert("RGB")
    sx, sy = picture.width / model_size, picture.height / model_size
    x0, y0, x1, y1 = box_xyxy
    ImageDraw.Draw(picture).rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=BOX_COLOUR, width=BOX_WIDTH)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(output)
    return output


def predict_command(args: argparse.Namespace) -> int:
    text = args.question or args.expression
    with tempfile.TemporaryDirectory() as scratch:
        try:
            source = resolve_init(args.model, Path(scratch))
            task = load_task_package(source.directory)
        except (InitSourceError, PredictError) as exc:
            print(f"mplug predict: {exc}", file=sys.stderr)
            return 2
        wanted = "vqa" if args.question else "grounding" if args.expression else "caption"
        if task.name != wanted:
            print(f"mplug predict: {args.model} is a {task.name} model; ask it with {FLAG_OF_TASK.get(task.name)}",
                  file=sys.stderr)
            return 2
        try:
            result = predict(task, args.image, text)
        except PredictError as exc:
            print(f"mplug predict: {exc}", file=sys.stderr)
            return 2
    if "box_xyxy" in result:
        output = args.output or args.image.with_name(f"{args.image.stem}_box.png")
        result["drawn"] = str(draw_box(args.image, result["box_xyxy"], result["image_size"], output))
    print(json.dumps(result))
    return 0
