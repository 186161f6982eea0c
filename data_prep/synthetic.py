"""Procedurally generated image-text pairs: coloured shapes on a plain background.

Deterministic by seed. Each scene holds one to three shapes of distinct colours; its caption
names them from left to right ("a red circle left of a blue square"), so a model can only match
captions to images by looking at colours, shapes and their order. `caption_variants` gives the
paraphrases a captioning set wants (five sentences an image, as in Karpathy's splits); questions
and referring expressions are in `synthetic_tasks`, the files on disk in `synthetic_export`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
NUMBER_WORDS = ("zero", "one", "two", "three")
POSITION_WORDS = {2: ("on the left", "on the right"), 3: ("on the left", "in the middle", "on the right")}


@dataclass
class Shape:
    colour: str
    kind: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind}"

    @property
    def name(self) -> str:
        """Colour and kind without an article: "red circle"."""
        return f"{self.colour} {self.kind}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def coco_box(self) -> list[float]:
        """The box as COCO writes it: [x, y, width, height] in pixels, to two decimals."""
        x0, y0, x1, y1 = self.box
        return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]

    @property
    def area(self) -> float:
        """Area of the drawn shape in square pixels (a circle and a triangle fill less than their box)."""
        x0, y0, x1, y1 = self.box
        box_area = (x1 - x0) * (y1 - y0)
        return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[self.kind] * box_area


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]

    @property
    def caption(self) -> str:
        return " left of ".join(s.phrase() for s in self.shapes)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_scene(rng: random.Random, size: int = 64, max_shapes: int = 3) -> Scene:
    """One scene; shapes sit in distinct horizontal slots, listed left to right."""
    count = rng.randint(1, max_shapes)
    colours = rng.sample(sorted(COLOURS), count)
    slots = sorted(rng.sample(range(max_shapes), count))
    slot_width = size / max_shapes
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    shapes = []
    for colour, slot in zip(colours, slots, strict=True):
        extent = rng.uniform(0.55, 0.9) * slot_width
        x0 = slot * slot_width + rng.uniform(0, slot_width - extent)
        y0 = rng.uniform(0, size - extent)
        shape = Shape(colour, rng.choice(SHAPES), (x0, y0, x0 + extent, y0 + extent))
        draw_shape(draw, shape)
        shapes.append(shape)
    return Scene(image=image, shapes=shapes)


def make_scenes(count: int, seed: int = 0, size: int = 64) -> list[Scene]:
    rng = random.Random(seed)
    return [make_scene(rng, size) for _ in range(count)]


def _listing(phrases: list[str]) -> str:
    """"a, b and c" / "a and b" / "a"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _counted(shapes: list[Shape]) -> str:
    noun = "shape" if len(shapes) == 1 else "shapes"
    return f"{NUMBER_WORDS[len(shapes)]} {noun}"


def caption_variants(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` different true captions of `scene`: its left-to-right caption first, then paraphrases.

    Paraphrases name the shapes right to left, list them, count them or place them ("on the
    left"); which ones, and in what order, is drawn from `rng`.
    """
    shapes = scene.shapes
    phrases = [s.phrase() for s in shapes]
    listing = _listing(phrases)
    paraphrases = [
        f"there is {listing}" if len(shapes) == 1 else f"there are {listing}",
        f"{_counted(shapes)}: {listing}",
        f"a picture of {listing}",
    ]
    if len(shapes) == 1:
        paraphrases += [f"a single {shapes[0].name}", f"only {phrases[0]}"]
    else:
        paraphrases += [
            " right of ".join(reversed(phrases)),
            _listing([f"{p} {w}" for p, w in zip(phrases, POSITION_WORDS[len(shapes)], strict=True)]),
            f"{listing} from left to right",
        ]
    rng.shuffle(paraphrases)
    return [scene.caption] + paraphrases[: max(count - 1, 0)]


def vocabulary_texts() -> list[str]:
    """Every word a synthetic caption, question, answer or referring expression can use, for
    building a tokenizer that covers them."""
    return [
        " ".join(COLOURS),
        " ".join(SHAPES),
        "a an left of",
        "right there is are one two three shape shapes on the in middle picture",
        "and single only from to",
        "what color shape object how many circles squares triangles leftmost rightmost yes no",
        "zero 0 1 2 3 ? : ,",
    ]
