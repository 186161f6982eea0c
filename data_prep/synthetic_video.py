"""Procedurally generated videos: a coloured shape moving left, right, up or down, as mp4 clips.

Deterministic by seed. A clip shows one shape of `synthetic.py`'s colours and kinds crossing
half the frame in a straight line at constant speed over a plain background, so its direction is
plain from its first and last frames and nothing else in the clip tells it. Captions name colour,
shape and direction ("a red circle moves to the left"), questions ask for the direction ("which
way does the red circle move?" -> "left"), the colour, the shape, or whether it moves a given
way; an action label is the direction.

Three ways to write them:

    write_video_task_shards(root, seed=0)           ROOT/<task>/{train,val,test}/ shards + manifest.json
        video_qa               one sample per question: question_id, question, answers, weights,
                               annotator_answers, answer_type, question_type (+ answer_list.json)
        video_caption          Karpathy's layout: in train one sample per caption, else one per clip
                               with all its `captions`; video_retrieval reads the same folder
        action_classification  one sample per clip: label (index into labels.json), label_name
    write_video_pretrain_shards(root, count)        KEY.mp4, KEY.txt (a caption), KEY.json; manifest.json
    write_video_url_list(root, count, base_url=...) ROOT/videos/N.mp4 + ROOT/webvid.csv (WebVid's columns)

Every KEY.json has `image_id` (int, the clip's number, unique in its data set) and `video_id`
("video7"). A horizontal flip (training augmentation) mirrors a leftward clip into a rightward
one and the loader swaps "left" and "right" in its texts to match; `label` is a number and is not
swapped, so a classifier trained on these labels should train with flip off, or read `label_name`.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_writer import Sample, ShardWriter, write_json
from data_prep.synthetic import BACKGROUND, COLOURS, SHAPES, Shape, draw_shape
from data_prep.synthetic_tasks import ANNOTATORS, Question

DIRECTIONS = ("left", "right", "up", "down")  # the action classes, in label order
MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # unit step (x, y), y downwards
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
FPS = 8
SHAPE_EXTENT = (0.2, 0.3)  # the shape's side as a share of the frame side
TRAVEL = 0.5  # how far the shape moves from the first frame to the last, as a share of the frame side
MIN_SIZE = 32
MIN_FRAMES = 2  # motion needs a first and a last frame
CAPTIONS_PER_CLIP = 5
SHARD_SIZE = 64  # as synthetic_task_shards: a few shards even for small sets, so ranks share them
SOURCE = "synthetic_video"
TASKS = ("video_qa", "video_caption", "video_retrieval", "action_classification")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")  # results_2M_train.csv's order
WEBVID_PAGE = 50  # clips per WebVid page_dir


@dataclass
class Clip:
    shape: Shape  # colour, kind, and its box in the first frame
    direction: str
    frames: list[np.ndarray]  # (S, S, 3) uint8 RGB
    centres: list[tuple[float, float]]  # the shape's centre (x, y) in each frame

    @property
    def caption(self) -> str:
        return f"{self.shape.phrase()} moves {DIRECTION_PHRASES[self.direction]}"


def make_clip(rng: random.Random, frames: int = 8, size: int = 64) -> Clip:
    """One clip: a random colour, kind and direction; the shape crosses TRAVEL of the frame."""
    if frames < MIN_FRAMES:
        raise ValueError(f"a moving-shape clip needs at least {MIN_FRAMES} frames, got {frames}")
    if size < MIN_SIZE or size % 2:
        raise ValueError(f"clip size must be an even number of pixels >= {MIN_SIZE} (yuv420p), got {size}")
    colour, kind, direction = rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    extent = rng.uniform(*SHAPE_EXTENT) * size
    travel = TRAVEL * size
    low, high = extent / 2, size - extent / 2  # where a centre keeps the whole shape in frame
    along = rng.uniform(low, high - travel)  # the start on the axis of motion, moving towards +
    across = rng.uniform(low, high)
    dx, dy = MOTION[direction]
    if dx + dy < 0:  # left or up: start at the far end
        along = size - along
    images, shapes = [], []
    for index in range(frames):
        shift = travel * index / (frames - 1)
        cx, cy = (along + dx * shift, across) if dx else (across, along + dy * shift)
        shapes.append(Shape(colour, kind, (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)))
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(image), shapes[-1])
        images.append(np.asarray(image))
    return Clip(shapes[0], direction, images, [shape.centre for shape in shapes])


def encode_mp4(frames: Sequence[np.ndarray], fps: int = FPS, *, preset: str = "veryfast",
               crf: int | None = None) -> bytes:
    """RGB frames (H, W, 3) uint8 -> H.264 mp4 bytes (yuv420p, one encoder thread; MPEG-4 part 2
    where this FFmpeg lacks libx264). H and W must be even; `preset` and `crf` are x264's."""
    height, width = frames[0].shape[:2]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # the same bytes on every machine, and no oversubscription
        if codec == "libx264":
            stream.options = {"preset": preset, **({"crf": str(crf)} if crf is not None else {})}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


def clip_captions(clip: Clip, rng: random.Random, count: int = CAPTIONS_PER_CLIP) -> list[str]:
    """`count` true captions: "a red circle moves to the left" first, then paraphrases in random order."""
    article_name, phrase, word = clip.shape.phrase(), DIRECTION_PHRASES[clip.direction], clip.direction
    paraphrases = [
        f"{article_name} moving {word}",
        f"the {clip.shape.name} goes {phrase}",
        f"{article_name} slides {phrase}",
        f"a video of {article_name} moving {word}",
        f"{article_name} travels {phrase}",
    ]
    rng.shuffle(paraphrases)
    return [clip.caption] + paraphrases[: max(count - 1, 0)]


def _question(text: str, answer: str, answer_type: str, question_type: str) -> Question:
    return Question(text, answer, answer_type, question_type, [answer] * ANNOTATORS)


def clip_questions(clip: Clip, rng: random.Random) -> list[Question]:
    """Four questions: the direction (the motion question), the colour, the kind, and a yes/no
    on a direction (yes by a fair coin, else another direction)."""
    shape, direction = clip.shape, clip.direction
    asked = direction if rng.random() < 0.5 else rng.choice([d for d in DIRECTIONS if d != direction])
    return [
        _question(f"Which way does the {shape.name} move?", direction, "other", "which way does the"),
        _question("What color is the moving shape?", shape.colour, "other", "what color is the"),
        _question(f"What shape moves {DIRECTION_PHRASES[direction]}?", shape.kind, "other", "what shape"),
        _question(f"Does the {shape.name} move {DIRECTION_PHRASES[asked]}?",
                  "yes" if asked == direction else "no", "yes/no", "does the"),
    ]


def answer_vocabulary() -> list[str]:
    """Every answer a clip's question can have, sorted: the candidates for ranking answers."""
    return sorted({*DIRECTIONS, *COLOURS, *SHAPES, "yes", "no"})


def vocabulary_texts() -> list[str]:
    """The words of the video captions and questions, for a tokenizer that covers them."""
    return [
        " ".join(COLOURS), " ".join(SHAPES), " ".join(DIRECTIONS),
        "a an the moves moving goes slides travels to video of which way does move what color is shape yes no ?",
    ]


@dataclass
class ClipRecord:
    """A clip as written: its number, split, encoded bytes and texts."""

    image_id: int
    split: str
    clip: Clip
    data: bytes
    captions: list[str]
    questions: list[Question]

    @property
    def video_id(self) -> str:
        return f"video{self.image_id}"

    def meta(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "video_id": self.video_id, "source": SOURCE}


def make_records(splits: dict[str, int], seed: int, frames: int, size: int, namespace: str) -> list[ClipRecord]:
    """Clips numbered 1, 2, ... through the splits in order; clip n depends only on (namespace, seed, n)."""
    records = []
    for split, count in splits.items():
        for _ in range(count):
            image_id = len(records) + 1
            rng = random.Random(f"{namespace}:{seed}:{image_id}")
            clip = make_clip(rng, frames, size)
            records.append(ClipRecord(image_id, split, clip, encode_mp4(clip.frames),
                                      clip_captions(clip, rng), clip_questions(clip, rng)))
    return records


def _write_split(folder: Path, samples: list[Sample], **fields: Any) -> Path:
    with ShardWriter(str(folder), SHARD_SIZE) as writer:
        for sample in samples:
            writer.write(sample)
    counts = [min(SHARD_SIZE, len(samples) - i * SHARD_SIZE) for i in range(len(writer.shards))]
    write_manifest(str(folder), [ShardInfo(url, n) for url, n in zip(writer.shards, counts, strict=True)],
                   format=SOURCE, **fields)
    return folder


def qa_samples(record: ClipRecord) -> list[Sample]:
    """One sample per question, with the fields `data_prep.convert.vqa` writes (one unanimous answer)."""
    samples = []
    for index, question in enumerate(record.questions):
        question_id = record.image_id * 1000 + index  # VQA v2's numbering
        meta = {**record.meta(), "question_id": question_id, "question": question.text,
                "answers": [question.answer], "weights": [1.0], "annotator_answers": question.answers,
                "answer_type": question.answer_type, "question_type": question.question_type}
        samples.append(Sample(str(question_id), record.data, "mp4", question.text, meta))
    return samples


def caption_samples(record: ClipRecord) -> list[Sample]:
    """Karpathy's layout (`data_prep.convert.common.caption_samples`): in train a sample per caption."""
    meta = {**record.meta(), "captions": record.captions, "split": record.split}
    if record.split != "train":
        return [Sample(record.video_id, record.data, "mp4", record.captions[0], meta)]
    return [Sample(f"{record.video_id}_{index}", record.data, "mp4", caption, {**meta, "sent_id": index})
            for index, caption in enumerate(record.captions)]


def action_sample(record: ClipRecord) -> Sample:
    direction = record.clip.direction
    meta = {**record.meta(), "label": DIRECTIONS.index(direction), "label_name": direction, "split": record.split}
    return Sample(record.video_id, record.data, "mp4", record.captions[0], meta)


def write_video_task_shards(root: str | Path, *, seed: int = 0, frames: int = 8, size: int = 64,
                            train_clips: int = 96, eval_clips: int = 30) -> dict[str, Path]:
    """Shards of the four video tasks under ROOT; returns task name -> its folder of split folders.

    `train_clips` clips for train and `eval_clips` each for val and test, shared by the tasks:
    video QA has four questions a clip (120 val questions at the default 30), captioning and
    retrieval (one folder) five captions a clip, action classification one label a clip.
    """
    if train_clips < 1 or eval_clips < 1:
        raise ValueError(f"train_clips and eval_clips must be >= 1, got {train_clips} and {eval_clips}")
    root = Path(root)
    splits = {"train": train_clips, "val": eval_clips, "test": eval_clips}
    records = make_records(splits, seed, frames, size, "synthetic-video-tasks")
    folders = {"video_qa": root / "video_qa", "video_caption": root / "video_caption",
               "action_classification": root / "action_classification"}
    for split in splits:
        chosen = [r for r in records if r.split == split]
        _write_split(folders["video_qa"] / split, [s for r in chosen for s in qa_samples(r)],
                     task="video_qa", split=split)
        _write_split(folders["video_caption"] / split, [s for r in chosen for s in caption_samples(r)],
                     task="video_caption", split=split)
        _write_split(folders["action_classification"] / split, [action_sample(r) for r in chosen],
                     task="action_classification", split=split)
    write_json(str(folders["video_qa"] / "answer_list.json"), answer_vocabulary())
    write_json(str(folders["action_classification"] / "labels.json"), list(DIRECTIONS))
    return {**folders, "video_retrieval": folders["video_caption"]}


def write_video_pretrain_shards(root: str | Path, count: int, *, seed: int = 0, frames: int = 8,
                                size: int = 64) -> Path:
    """`count` clips as pretraining shards (KEY.mp4, KEY.txt: one of its captions, KEY.json) + manifest.json."""
    if count < 1:
        raise ValueError(f"count must be at least 1 clip, got {count}")
    root = Path(root)
    records = make_records({"train": count}, seed, frames, size, "synthetic-video-pretrain")
    samples = []
    for record in records:
        clip, caption = record.clip, random.Random(f"caption:{seed}:{record.image_id}").choice(record.captions)
        meta = {**record.meta(), "colour": clip.shape.colour, "shape": clip.shape.kind, "direction": clip.direction}
        samples.append(Sample(f"{record.image_id:08d}", record.data, "mp4", caption, meta))
    return _write_split(root, samples, task="pretrain", split="train")


def webvid_duration(seconds: float) -> str:
    """WebVid's ISO 8601 duration of whole seconds: 11 s -> "PT00H00M11S"."""
    total = max(1, round(seconds))
    return f"PT{total // 3600:02d}H{total % 3600 // 60:02d}M{total % 60:02d}S"


def write_video_url_list(root: str | Path, count: int, *, seed: int = 0, frames: int = 8, size: int = 64,
                         base_url: str = DEFAULT_BASE_URL) -> Path:
    """`count` clips as files ROOT/videos/N.mp4 and a WebVid-style list ROOT/webvid.csv; returns the csv.

    Columns as WebVid's results_*.csv: videoid (N), contentUrl (BASE_URL/videos/N.mp4: serve ROOT
    at BASE_URL, e.g. with `data_prep.serve.LoopbackServer(ROOT)` started first), duration,
    page_dir, name (the clip's caption). The clips are those of `write_video_pretrain_shards`
    with the same seed, frames and size.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1 clip, got {count}")
    root, base_url = Path(root), base_url.rstrip("/")
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for record in make_records({"train": count}, seed, frames, size, "synthetic-video-pretrain"):
        name = f"{record.image_id}.mp4"
        (root / "videos" / name).write_bytes(record.data)
        page = (record.image_id - 1) // WEBVID_PAGE
        rows.append((record.image_id, f"{base_url}/videos/{name}", webvid_duration(frames / FPS),
                     f"{page * WEBVID_PAGE + 1:06d}_{(page + 1) * WEBVID_PAGE:06d}", record.captions[0]))
    path = root / "webvid.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(WEBVID_COLUMNS)
        writer.writerows(rows)
    return path
