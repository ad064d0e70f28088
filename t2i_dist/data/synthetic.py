"""A deterministic captioned data set a tiny model can learn text conditioning from.

Each image shows one or two coloured shapes on a plain background; the caption names colour, shape, size and
position from a small vocabulary ("a small red circle at the top left", "a red circle above a blue square").
Captions sometimes leave size or position out, so short prompts ("a red circle") are in distribution too.
Sample `index` under `seed` always renders the same pixels, in any process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from t2i_dist.data.writing import write_shards
from t2i_dist.images import png_bytes

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# side of the shape's bounding box as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.24, "large": 0.46}
# 3x3 grid: phrase used in captions -> centre (x, y) as fractions of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# two-object relations: relation -> (position of the first object, position of the second)
RELATIONS: dict[str, tuple[str, str]] = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "left of": ("left", "right"),
    "right of": ("right", "left"),
}
BACKGROUND = (238, 238, 232)
TWO_OBJECT_FRACTION = 0.2
SUPERSAMPLE = 4  # draw larger and downsample, for smooth edges at 32 px


def position_phrase(position: str) -> str:
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], side: float, fill) -> None:
    cx, cy = centre
    half = side / 2
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon(((cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)), fill=fill)


def _one_object(rng: np.random.Generator, position: str | None = None) -> dict[str, Any]:
    return {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "size": str(rng.choice(list(SIZES))),
        "position": position or str(rng.choice(list(POSITIONS))),
    }


def with_article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _caption_one(obj: dict[str, Any], rng: np.random.Generator) -> str:
    # keep size/position in most captions; dropping them sometimes teaches that an omitted word means "any"
    words = []
    if rng.random() < 0.75:
        words.append(obj["size"])
    words += [obj["colour"], obj["shape"]]
    if rng.random() < 0.75:
        words.append(position_phrase(obj["position"]))
    return with_article(" ".join(words))


def sample_attributes(index: int, seed: int = 0) -> dict[str, Any]:
    """Caption and attributes of sample `index`: colour/shape/size/position of the (first) object,
    `objects` (all objects) and, for two objects, `relation`."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < TWO_OBJECT_FRACTION:
        relation = str(rng.choice(list(RELATIONS)))
        first_pos, second_pos = RELATIONS[relation]
        first, second = _one_object(rng, first_pos), _one_object(rng, second_pos)
        first["size"] = second["size"] = "small"  # two large shapes would overlap
        while (second["colour"], second["shape"]) == (first["colour"], first["shape"]):
            second["colour"] = str(rng.choice(list(COLOURS)))
        caption = (
            f"{with_article(first['colour'] + ' ' + first['shape'])} {relation} "
            f"{with_article(second['colour'] + ' ' + second['shape'])}"
        )
        objects, extra = [first, second], {"relation": relation}
    else:
        obj = _one_object(rng)
        caption = _caption_one(obj, rng)
        objects, extra = [obj], {}
    jitter = [tuple(float(v) for v in rng.uniform(-0.04, 0.04, size=2)) for _ in objects]
    for obj, offset in zip(objects, jitter, strict=True):
        obj["offset"] = offset
    return {
        "caption": caption,
        **{k: objects[0][k] for k in ("colour", "shape", "size", "position")},
        "objects": objects,
        **extra,
        "index": index,
    }


def render_sample(index: int, size: int, seed: int = 0) -> tuple[Image.Image, dict[str, Any]]:
    """Render sample `index` as a `size` x `size` RGB image; returns (image, attributes incl. caption)."""
    attrs = sample_attributes(index, seed)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in attrs["objects"]:
        fx, fy = POSITIONS[obj["position"]]
        dx, dy = obj["offset"]
        _draw_shape(
            draw, obj["shape"], ((fx + dx) * big, (fy + dy) * big), SIZES[obj["size"]] * big, COLOURS[obj["colour"]]
        )
    return image.resize((size, size), Image.Resampling.LANCZOS), attrs


def synthetic_samples(num_samples: int, image_size: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    for index in range(num_samples):
        image, attrs = render_sample(index, image_size, seed)
        yield {"__key__": f"{index:08d}", "png": png_bytes(image), "txt": attrs["caption"], "json": json.dumps(attrs)}


def write_synthetic_shards(
    out_dir: str | Path, num_samples: int, samples_per_shard: int, image_size: int, seed: int = 0
) -> list[str]:
    """Write `num_samples` synthetic samples to `out_dir/shard-%06d.tar` (keys png, txt, json)."""
    return write_shards(synthetic_samples(num_samples, image_size, seed), out_dir, samples_per_shard)
