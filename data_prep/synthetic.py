"""Procedurally generated image-text pairs: coloured shapes on a plain background.

Deterministic by seed. Each scene holds one to three shapes of distinct colours; its caption
names them from left to right ("a red circle left of a blue square"), so a model can only match
captions to images by looking at colours, shapes and their order.
"""

from __future__ import annotations

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


@dataclass
class Shape:
    colour: str
    kind: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind}"


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


def vocabulary_texts() -> list[str]:
    """Every word a synthetic caption can use, for building a tokenizer that covers them."""
    return [" ".join(COLOURS), " ".join(SHAPES), "a an left of"]
