"""The built-in captioned "shapes" data set: seeded renders of one or two coloured shapes.

Every sample is a pure function of ``(seed, split, index)``: ``sample_attributes`` draws the
caption and attributes, ``render_sample`` draws them as an anti-aliased RGB image. Splits:

* ``"train"`` and ``"validation"`` (same distribution, other random streams): the valid
  (colour, shape, background) triples except the held-out ones; one shape, or two with
  probability ``two_shape_fraction`` (both shapes' triples are training triples).
* ``"heldout"``: single-shape samples of the ``HELDOUT_TRIPLES`` only, combinations that train
  never shows (compositional generalisation). Every colour, shape, background and
  (colour, shape) pair still appears in train.

``load_shapes_dataset`` wraps a split as a ``datasets.Dataset``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import datasets

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 120, 10),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (150, 150, 150),
    "blue": (70, 110, 200),
}

MIN_CONTRAST = 90.0
"""Smallest RGB distance (0..255 scale) between a shape colour and its background."""

SIZES: dict[str, float] = {"small": 0.1, "medium": 0.15, "large": 0.2}
"""Half-extent of a shape as a fraction of the image side (before a +-8% jitter)."""

POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
"""Position name -> (row, column) on a 3x3 grid; cell centres lie at 0.25/0.5/0.75 of the side."""

POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}

GRID_CENTERS = (0.25, 0.5, 0.75)
POSITION_JITTER = 0.025
SIZE_JITTER = 0.08
SUPERSAMPLING = 4

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{desc} on a {background} background",
    "a photo of {desc} on a {background} background",
    "an image of {desc} on a {background} background",
    "{desc}, {background} background",
)

SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


VALID_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    (color, shape, background)
    for color, shape, background in itertools.product(COLORS, SHAPES, BACKGROUNDS)
    if _distance(COLORS[color], BACKGROUNDS[background]) >= MIN_CONTRAST
)
"""All (colour, shape, background) triples whose colour contrasts with the background."""

HELDOUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "black"), ("green", "circle", "white"), ("blue", "triangle", "gray"),
    ("yellow", "circle", "black"), ("purple", "square", "white"), ("orange", "triangle", "blue"),
    ("white", "circle", "gray"), ("black", "triangle", "white"), ("red", "triangle", "blue"),
    ("green", "square", "gray"), ("yellow", "square", "blue"), ("purple", "circle", "black"),
)
"""Held-out triples (~14% of the valid ones): each shape 4 times, each background 3 times."""

TRAIN_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(t for t in VALID_TRIPLES if t not in HELDOUT_TRIPLES)

_SINGLE_KEYS = ("color", "shape", "size", "position")
ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "color", "shape", "size", "position", "background", "num_shapes", "color2", "shape2", "size2", "position2"
)
"""Attribute keys of every sample; the ``*2`` keys are ``None`` for single-shape samples."""


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown shapes split {split!r}; expected one of {SPLITS}.")


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, (int, np.integer)) or resolution < 16:
        raise ValueError(f"resolution must be an integer >= 16 (32..256 is tested), got {resolution!r}.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(rng: np.random.Generator, color: str, shape: str, size: str, position: str, with_position: bool) -> str:
    """'a small red circle in the top left'; size is sometimes omitted, 'medium' usually."""
    words = [color, shape]
    if rng.random() < (0.3 if size == "medium" else 0.7):
        words.insert(0, size)
    if with_position:
        words.append(POSITION_PHRASES[position])
    return " ".join([_article(words[0])] + words)


def sample_attributes(
    index: int, split: str = "train", seed: int = 0, two_shape_fraction: float = 0.25
) -> tuple[str, dict[str, object | None]]:
    """Caption and attributes of sample ``index`` of ``split``; pure in its arguments.

    Returns ``(caption, attributes)`` with the keys of ``ATTRIBUTE_COLUMNS``. The held-out split
    ignores ``two_shape_fraction`` (always one shape).
    """
    _check_split(split)
    if not 0.0 <= two_shape_fraction <= 1.0:
        raise ValueError(f"two_shape_fraction must be in [0, 1], got {two_shape_fraction}.")
    if index < 0:
        raise ValueError(f"Sample index must be >= 0, got {index}.")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    triples = HELDOUT_TRIPLES if split == "heldout" else TRAIN_TRIPLES
    color, shape, background = triples[rng.integers(len(triples))]
    two = split != "heldout" and rng.random() < two_shape_fraction
    attrs: dict[str, object | None] = dict.fromkeys(ATTRIBUTE_COLUMNS)
    attrs.update(color=color, shape=shape, background=background, num_shapes=2 if two else 1)
    attrs["size"] = list(SIZES)[rng.integers(len(SIZES))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    with_position = bool(rng.random() < 0.7)
    if not two:
        attrs["position"] = list(POSITIONS)[rng.integers(len(POSITIONS))]
        desc = _describe(rng, color, shape, attrs["size"], attrs["position"], with_position)
    else:
        # Second shape: another training triple on the same background, in a different colour,
        # two grid cells away in some direction so that the shapes never overlap.
        seconds = [t for t in TRAIN_TRIPLES if t[2] == background and t[0] != color]
        attrs["color2"], attrs["shape2"], _ = seconds[rng.integers(len(seconds))]
        attrs["size2"] = list(SIZES)[rng.integers(len(SIZES))]
        pairs = [(p, q) for p, q in itertools.permutations(POSITIONS, 2)
                 if max(abs(a - b) for a, b in zip(POSITIONS[p], POSITIONS[q], strict=True)) == 2]
        attrs["position"], attrs["position2"] = pairs[rng.integers(len(pairs))]
        desc = " and ".join(
            _describe(rng, *(attrs[k + suffix] for k in _SINGLE_KEYS), with_position) for suffix in ("", "2")
        )
    return template.format(desc=desc, background=background), attrs


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    """Draw ``shape`` with box centre (cx, cy) and half-extent ``half`` (pixels); triangles point up."""
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render_attributes(attrs: dict[str, object | None], resolution: int = 64, jitter_seed=0) -> Image.Image:
    """Draw ``attrs`` (as from ``sample_attributes``) as a ``resolution`` x ``resolution`` RGB image.

    Drawn at ``SUPERSAMPLING``x and box-downsampled (anti-aliased); ``jitter_seed`` (anything
    ``np.random.default_rng`` accepts) seeds the small position/size jitter.
    """
    _check_resolution(resolution)
    rng = np.random.default_rng(jitter_seed)
    side = resolution * SUPERSAMPLING
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(canvas)
    for suffix in ("", "2")[: int(attrs.get("num_shapes") or 1)]:
        row, col = POSITIONS[attrs["position" + suffix]]
        cx, cy = (np.array([GRID_CENTERS[col], GRID_CENTERS[row]]) + rng.uniform(-1, 1, 2) * POSITION_JITTER) * side
        half = SIZES[attrs["size" + suffix]] * (1 + rng.uniform(-1, 1) * SIZE_JITTER) * side
        draw_shape(draw, attrs["shape" + suffix], cx, cy, half, COLORS[attrs["color" + suffix]])
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def render_sample(
    index: int, split: str = "train", seed: int = 0, resolution: int = 64, two_shape_fraction: float = 0.25
) -> tuple[Image.Image, str, dict[str, object | None]]:
    """Sample ``index`` of ``split`` as ``(image, caption, attributes)``; a pure function of its arguments.

    ``image`` is an RGB ``PIL.Image`` of ``resolution`` x ``resolution`` pixels.
    """
    caption, attrs = sample_attributes(index, split, seed, two_shape_fraction)
    image = render_attributes(attrs, resolution, jitter_seed=[seed, _SPLIT_IDS[split], index, 1])
    return image, caption, attrs


def heldout_prompts(num_prompts: int = 64, seed: int = 0) -> list[tuple[str, dict[str, object | None]]]:
    """The first ``num_prompts`` held-out ``(caption, attributes)`` pairs (single-shape, unseen triples)."""
    return [sample_attributes(i, "heldout", seed) for i in range(num_prompts)]


def _generate(split: str, num_samples: int, resolution: int, seed: int, two_shape_fraction: float,
              source_hash: str) -> Iterator[dict]:
    """Rows of ``load_shapes_dataset``; ``source_hash`` only keys the Arrow cache to this file's code."""
    for index in range(num_samples):
        image, caption, attrs = render_sample(index, split, seed, resolution, two_shape_fraction)
        yield {"image": image, "text": caption, **attrs}


def load_shapes_dataset(
    split: str = "train",
    num_samples: int = 10_000,
    resolution: int = 64,
    seed: int = 0,
    two_shape_fraction: float = 0.25,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The shapes ``split`` as a ``datasets.Dataset`` of ``num_samples`` rows.

    Columns: ``image`` (``datasets.Image()``, RGB ``resolution`` px), ``text`` (caption) and the
    ``ATTRIBUTE_COLUMNS`` (strings; ``num_shapes`` int; ``*2`` null for single-shape rows).
    Built with ``Dataset.from_generator``, so a repeated call with the same arguments (and the same
    version of this file) reads the Arrow cache in ``cache_dir`` (default: the ``datasets`` cache).
    """
    import datasets

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    _check_resolution(resolution)
    sample_attributes(0, split, seed, two_shape_fraction)  # validates split and fraction early
    string = datasets.Value("string")
    features = datasets.Features(
        {"image": datasets.Image(), "text": string,
         **{c: datasets.Value("int32") if c == "num_shapes" else string for c in ATTRIBUTE_COLUMNS}}
    )
    kwargs = dict(split=split, num_samples=int(num_samples), resolution=int(resolution), seed=int(seed),
                  two_shape_fraction=float(two_shape_fraction),
                  source_hash=hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    return datasets.Dataset.from_generator(_generate, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
