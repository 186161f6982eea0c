"""`mplug predict`: one image or one video through a fine-tuned model package.

    --image: vqa (--question), caption (--task caption), grounding (--expression, the box also
             drawn on a copy of the image), retrieval (--text, repeated: the candidates scored)
    --video: video_qa (--question), video_caption (--task caption), video_retrieval (--text ...),
             action_classification (--task classify: the top classes, named)

The package names its task (package.json `extra.task`, written by `mplug finetune`), so the
model is rebuilt as that task with the settings it was trained with, and what the task added to
its package (an action head and its class names, a video QA answer list) is read back. A video
is decoded as evaluation reads it: `data.frames` frames of the package's config, the middle frame
of each segment, resized and normalised as the evaluation loader does.
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
from data_prep.video_decode import VideoDecodeError, decode_video
from finetune.init_source import InitSourceError, resolve_init
from finetune.registry import task_class
from finetune.tasks.base import TaskModel
from finetune.tasks.retrieval import MATCH
from pretrain.config import load_config
from pretrain.config.typed import from_dict
from pretrain.models.mplug import image_feature, text_feature
from pretrain.package import CONFIG_FILE, load_package, read_package_info

FLAG_OF_TASK = {"vqa": "--question", "caption": "--task caption", "grounding": "--expression", "retrieval": "--text",
                "video_qa": "--question", "video_caption": "--task caption", "video_retrieval": "--text",
                "action_classification": "--task classify"}
TOP_CLASSES = 5  # classes `--task classify` prints
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
    package = load_package(directory, momentum=task_cls.uses_momentum and info.momentum)
    task = task_cls(package.model, settings, package.tokenizer)
    try:
        task.load_package_files(directory)
    except (OSError, ValueError) as exc:
        raise PredictError(f"{directory}: {exc}") from None
    return task.eval()


def package_frames(directory: Path) -> int:
    """The frames per clip the package's model was fine-tuned with (its config's data.frames)."""
    return load_config(str(Path(directory) / CONFIG_FILE)).data.frames


def image_batch(path: Path, image_size: int) -> torch.Tensor:
    """(1, 3, S, S) normalised, resized as evaluation resizes."""
    try:
        image = decode_rgb(path.read_bytes())
    except FileNotFoundError:
        raise PredictError(f"image {path} does not exist") from None
    except Exception as exc:
        raise PredictError(f"image {path} could not be decoded ({exc}); give a JPEG, PNG or WebP file") from None
    return model_input(image, image_size)


def video_batch(path: Path, frames: int, image_size: int) -> torch.Tensor:
    """(1, T, 3, S, S) normalised: `frames` segment-middle frames, resized as evaluation resizes."""
    try:
        clip = decode_video(path.read_bytes(), frames, train=False)  # (T, 3, H, W) uint8
    except FileNotFoundError:
        raise PredictError(f"video {path} does not exist") from None
    except VideoDecodeError as exc:
        raise PredictError(f"{path} is not a decodable video ({exc}); give an mp4, webm, avi, mkv or mov file") from None
    return model_input(clip, image_size)


def model_input(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (3, H, W) or (T, 3, H, W) -> a batch of one, resized and normalised as evaluation does."""
    return normalize(ImageAugment(AugmentConfig.preset("eval", image_size))(pixels).image.unsqueeze(0))


def text_batch(task: TaskModel, texts: list[str]) -> dict[str, torch.Tensor]:
    length = task.model.cfg.text.max_positions
    return tokenize(task.tokenizer, texts, min(length, 64))


@torch.no_grad()
def rank_texts(task: TaskModel, pixels: torch.Tensor, texts: list[str]) -> list[dict[str, Any]]:
    """The candidate texts of one image or clip (1, ...), best match first: ITM match probability and ITC similarity."""
    model = task.model
    tokens = text_batch(task, texts)
    vision = model.encode_image(pixels)  # (1, Lv, D)
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])  # (n, Lt, D)
    itc = (image_feature(model, vision) @ text_feature(model, text).T)[0]  # (n,) cosine similarities
    fused = model.fuse(text, tokens["attention_mask"], vision.expand(len(texts), -1, -1))
    match = model.itm_head(fused.text[:, 0]).float().softmax(dim=-1)[:, MATCH]  # (n,)
    ranked = sorted(zip(texts, match.tolist(), itc.tolist(), strict=True), key=lambda row: -row[1])
    return [{"text": t, "match": round(m, 6), "similarity": round(s, 6)} for t, m, s in ranked]


@torch.no_grad()
def predict(task: TaskModel, pixels: torch.Tensor, texts: list[str] | None) -> dict[str, Any]:
    """The task's answer for one image (1, 3, S, S) or clip (1, T, 3, S, S) and the request's texts."""
    batch: dict[str, Any] = {"images": pixels, "meta": [{}], "keys": ["input"]}
    if task.name in ("caption", "video_caption"):
        return {"caption": task.generate(pixels)[0]}
    if task.name == "action_classification":
        return {"top": [{"label": name, "probability": round(p, 6)}
                        for name, p in task.top_classes(pixels, TOP_CLASSES)[0]]}
    if not texts:
        raise PredictError(f"the {task.name} model needs {FLAG_OF_TASK[task.name]} TEXT")
    if task.name in ("retrieval", "video_retrieval"):
        return {"texts": rank_texts(task, pixels, texts)}
    batch.update(text_batch(task, texts[:1]))
    if task.name in ("vqa", "video_qa"):
        return {"question": texts[0], "answer": task.answer(batch)[0]}
    if task.name == "grounding":
        box = task.predict_boxes(batch)[0].tolist()  # xyxy in the resized image's pixels
        size = task.model.cfg.vision.image_size
        return {"expression": texts[0], "box_xyxy": box, "image_size": size}
    raise PredictError(f"mplug predict does not serve {task.name} models; it serves {', '.join(FLAG_OF_TASK)}")


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


def requested_flag(args: argparse.Namespace) -> str:
    """The flag of FLAG_OF_TASK the command line used."""
    if args.question:
        return "--question"
    if args.expression:
        return "--expression"
    if args.text:
        return "--text"
    return f"--task {args.task}"


def check_request(task: TaskModel, args: argparse.Namespace) -> None:
    """The package's task must be the one the flags ask for, on the kind of input it reads."""
    flag = requested_flag(args)
    if FLAG_OF_TASK.get(task.name) != flag:
        raise PredictError(f"{args.model} is a {task.name} model; ask it with {FLAG_OF_TASK.get(task.name)}, "
                           f"not {flag}")
    if task.video and args.video is None:
        raise PredictError(f"{args.model} is a video model ({task.name}); give it a clip with --video FILE")
    if not task.video and args.video is not None:
        raise PredictError(f"{args.model} is an image model ({task.name}), it cannot read the video {args.video}; "
                           "give it --image FILE, or use a model fine-tuned on a video task")


def predict_command(args: argparse.Namespace) -> int:
    texts = [args.question] if args.question else [args.expression] if args.expression else args.text
    with tempfile.TemporaryDirectory() as scratch:
        try:
            source = resolve_init(args.model, Path(scratch))
            task = load_task_package(source.directory)
            check_request(task, args)
            size = task.model.cfg.vision.image_size
            pixels = (video_batch(args.video, package_frames(source.directory), size) if task.video
                      else image_batch(args.image, size))
            result = predict(task, pixels, texts)
        except (InitSourceError, PredictError) as exc:
            print(f"mplug predict: {exc}", file=sys.stderr)
            return 2
    if "box_xyxy" in result:
        output = args.output or args.image.with_name(f"{args.image.stem}_box.png")
        result["drawn"] = str(draw_box(args.image, result["box_xyxy"], result["image_size"], output))
    print(json.dumps(result))
    return 0
