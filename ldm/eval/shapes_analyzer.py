"""Deterministic prompt-following analysis of shapes images, from pixels only (numpy + PIL).

``analyze_image`` recognises, for one image:

1. the background: median colour of the border ring (none if the border is not roughly uniform);
2. the main shape: largest 4-connected region far from the background (after a 3x3 box blur
   against noise); its colour is the median of its most saturated pixels, named by the nearest
   ``COLORS`` entry;
3. its kind, by analysis-by-synthesis: the image becomes a soft alpha map along the
   background -> shape-colour line, and a circle, a square and an (apex-up) triangle with the
   same area and centroid (both blur invariant) are drawn exactly as ``ldm.data.shapes`` draws
   them, at several blur widths; the best least-squares fit wins, and a poor best fit means
   "no shape". Its centre and size give ``position`` and ``size``;
4. the outline, as strictly as a person looks at it (``outline_measures`` on the half-level outline of the
   4x-upsampled alpha, ``OUTLINE_LIMITS``): a circle must not be elongated or have a point (ovals, teardrops,
   domes, blobs fail), a square must be convex and not elongated (pinched squares fail; strongly rounded ones fit
   a circle better), a triangle must be convex (pinched, concave-sided triangles fail). A failed outline is "no
   shape", not the nearest one.

Images larger than ``ANALYSIS_SIZE`` are box-downsampled first. ``prompt_accuracy`` scores images
against the attributes of the prompts they were generated from (e.g. from
``ldm.data.shapes.heldout_prompts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data.shapes import BACKGROUNDS, COLORS, GRID_CENTERS, POSITIONS, SIZES, SUPERSAMPLING, draw_shape

ANALYSIS_SIZE = 64
MAX_BORDER_SPREAD = 60.0  # median border-pixel distance to the background above which there is none
MIN_FOREGROUND_DISTANCE = 40.0  # pixels at least this far (RGB, 0..255) from the background are foreground
MAX_COLOR_ERROR = 110.0  # a colour further than this from every palette entry is unnamed (None)
MIN_AREA_FRACTION = 0.004  # smaller main regions are "no shape"
MAX_FOREGROUND_FRACTION = 0.6  # more foreground than this means no background/foreground split
MAX_FIT_ERROR = 0.04  # mean squared alpha error (above the noise) of the best fit; worse is "no shape"
# Per shape, (measure, lowest, highest) a person still accepts; tuned on deformed renders and on the bundled
# teacher's outputs judged by eye (tests/test_shapes.py). Clean renders: circle elongation <= 1.005, protrusion
# <= 1.03; square solidity >= 0.975; triangle solidity >= 0.96. (A strongly rounded square fits a circle better.)
OUTLINE_LIMITS = {
    "circle": (("elongation", 0, 1.12), ("protrusion", 0, 1.12)),
    "square": (("elongation", 0, 1.15), ("solidity", 0.95, 1)),
    "triangle": (("solidity", 0.92, 1),),
}
OUTLINE_UPSAMPLING = 4

ImageLike = Image.Image | np.ndarray
_SCORED = ("color", "shape", "background", "position", "size")


def _to_array(image: ImageLike) -> np.ndarray:
    """PIL image, HxWx3 uint8 array or HxWx3 float array in [0, 1] -> float64 HxWx3 in [0, 255]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Expected an HxWx3 array, got shape {image.shape}; convert CHW tensors with "
                             "`np.asarray(x).transpose(1, 2, 0)`.")
        if image.dtype != np.uint8:
            if image.min() < -1e-3 or image.max() > 1 + 1e-3:
                raise ValueError("Float images must lie in [0, 1]; rescale [-1, 1] outputs with (x + 1) / 2.")
            image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"Expected a PIL image or numpy array, got {type(image).__name__}.")
    image = image.convert("RGB")
    scale = ANALYSIS_SIZE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _box_blur3(pixels: np.ndarray) -> np.ndarray:
    """3x3 box blur of an HxWxC array (edges replicated)."""
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def _nearest(color: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str | None:
    names = list(palette)
    errors = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - color, axis=1)
    return names[int(errors.argmin())] if errors.min() <= MAX_COLOR_ERROR else None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean HxW mask of the largest 4-connected region of ``mask`` (all False if empty).

    Label propagation with pointer jumping: every pixel repeatedly takes the smallest label among
    itself and its 4 neighbours, then the label of the pixel that label names.
    """
    h, w = mask.shape
    if not mask.any():
        return mask.copy()
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        merged = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        merged = np.where(mask, merged, none)
        merged[mask] = merged.ravel()[merged[mask]]
        if np.array_equal(merged, labels):
            break
        labels = merged
    counts = np.bincount(labels[mask])
    return labels == counts.argmax()


# Per shape: area / half_extent**2 and centroid offset below the box centre / half_extent (a triangle
# with apex up, base 2h and height 2h has its centroid h/3 below its box centre).
_SHAPE_GEOMETRY = {"circle": (np.pi, 0.0), "square": (4.0, 0.0), "triangle": (2.0, 1 / 3)}
FIT_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # Gaussian blur std (analysis pixels) tried for each shape


def render_silhouette(shape: str, center: tuple[float, float], half: float, blur: float,
                      height: int, width: int) -> np.ndarray:
    """Anti-aliased, Gaussian-blurred (std ``blur`` px) HxW alpha in [0, 1] of a shape drawn
    as in ``ldm.data.shapes`` with (y, x) box centre ``center`` and half-extent ``half`` px."""
    scale = SUPERSAMPLING
    canvas = Image.new("L", (width * scale, height * scale), 0)
    cy, cx = center[0] * scale, center[1] * scale
    draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, half * scale, 255)
    canvas = canvas.resize((width, height), Image.Resampling.BOX)
    if blur > 0.25:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(blur)))
    return np.asarray(canvas, dtype=np.float64) / 255


def _fit_shapes(alpha: np.ndarray, window: tuple[slice, slice]) -> dict[str, dict[str, float]]:
    """Fit every shape to ``alpha`` inside ``window`` and score the fit.

    Area and centroid come from the alpha moments (a blur keeps both); the blur is the one of
    ``FIT_BLURS`` that fits best. Returns, per shape, ``error`` (mean squared alpha error in the
    window), ``half``, ``center_y``, ``center_x`` and ``blur`` of the fitted silhouette.
    """
    target = np.zeros_like(alpha)
    target[window] = np.clip(alpha[window], -0.5, 1.5)
    area = max(target.sum(), 1e-6)
    ys, xs = np.indices(alpha.shape) + 0.5
    mean_y, mean_x = (target * ys).sum() / area, (target * xs).sum() / area
    fits = {}
    for shape, (area_factor, offset) in _SHAPE_GEOMETRY.items():
        half = np.sqrt(area / area_factor)
        center = (mean_y - offset * half, mean_x)
        for blur in FIT_BLURS:
            silhouette = render_silhouette(shape, center, half, blur, *alpha.shape)
            error = float(np.mean((silhouette[window] - target[window]) ** 2))
            if shape not in fits or error < fits[shape]["error"]:
                fits[shape] = dict(error=error, half=float(half), center_y=float(center[0]), center_x=float(center[1]),
                                   blur=blur)
    return fits


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def chain(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.asarray(chain(pts) + chain(pts[::-1]), dtype=np.float64)
    y, x = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def outline_measures(alpha: np.ndarray, window: tuple[slice, slice]) -> dict[str, float]:
    """Shape measures of the half-level outline of ``alpha`` inside ``window`` (upsampled bilinearly,
    ``OUTLINE_UPSAMPLING``x or to 128 px across, so a small shape has a smooth outline): ``elongation``
    sqrt(lambda_max / lambda_min) of the region's second moments, ``solidity`` area / convex-hull area,
    ``protrusion`` the largest over the median distance of the outline from the centroid, ``fill`` area /
    bounding-box area."""
    crop = np.clip(alpha[window], -1, 2).astype(np.float32)
    factor = max(OUTLINE_UPSAMPLING, int(np.ceil(128 / max(crop.shape))))  # small shapes: at least 128 px across
    size = (crop.shape[1] * factor, crop.shape[0] * factor)
    up = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.Resampling.BILINEAR))
    region = largest_component(up > 0.5)
    ys, xs = np.nonzero(region)
    if len(ys) < 8:
        return {"elongation": np.inf, "solidity": 0.0, "protrusion": np.inf, "fill": 0.0}
    low, high = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
    padded = np.pad(region, 1)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    by, bx = np.nonzero(region & ~inside)
    radius = np.hypot(by - ys.mean(), bx - xs.mean())
    corners = np.concatenate([np.stack([by + dy, bx + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    return {"elongation": float(np.sqrt(high / max(low, 1e-9))), "solidity": len(ys) / max(_hull_area(corners), 1.0),
            "protrusion": float(radius.max() / max(np.median(radius), 1e-9)),
            "fill": len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))}


def outline_accepted(shape: str, measures: dict[str, float]) -> bool:
    """Whether a person would call an outline with ``measures`` a ``shape`` (``OUTLINE_LIMITS``)."""
    return all(low <= measures[name] <= high for name, low, high in OUTLINE_LIMITS[shape])


def _grid_position(center: np.ndarray, height: int, width: int) -> str:
    """(y, x) pixel centre -> nearest 3x3 grid position name."""
    centers = np.asarray(GRID_CENTERS)
    row = int(np.abs(centers - center[0] / height).argmin())
    col = int(np.abs(centers - center[1] / width).argmin())
    return next(name for name, cell in POSITIONS.items() if cell == (row, col))


def analyze_image(image: ImageLike) -> dict[str, object | None]:
    """Recognise the background and the main (largest) shape of ``image`` (PIL, HxWx3 uint8, or floats in [0, 1]).

    Returns a dict with ``background``, ``color``, ``shape`` (``"circle"|"square"|"triangle"``),
        ``position`` (3x3 grid name), ``size`` (``"small"|"medium"|"large"``), each ``None`` when
        not recognised (no uniform background, no single dominant shape, an off-palette colour),
        plus the measured ``background_rgb``/``color_rgb``, per-shape ``fits`` and the ``outline`` measures for
        debugging.
    """
    pixels = _to_array(image)
    height, width, _ = pixels.shape
    result: dict[str, object | None] = dict.fromkeys(_SCORED + ("background_rgb", "color_rgb", "fits", "outline"))
    ring = max(1, min(height, width) // 32)
    border = np.concatenate([pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
                             pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - background, axis=1)) > MAX_BORDER_SPREAD:
        return result
    result["background_rgb"] = tuple(float(v) for v in background.round(1))
    result["background"] = _nearest(background, BACKGROUNDS)

    smooth = _box_blur3(pixels)  # noise / 3 for the detection steps; the fit sees the raw pixels
    distance = np.linalg.norm(smooth - background, axis=2)
    foreground = distance > MIN_FOREGROUND_DISTANCE
    region = largest_component(foreground)
    if region.sum() < MIN_AREA_FRACTION * height * width or foreground.mean() > MAX_FOREGROUND_FRACTION:
        return result
    core = region & (distance >= 0.8 * np.percentile(distance[region], 95))
    color = np.median(pixels[core], axis=0)
    result["color_rgb"] = tuple(float(v) for v in color.round(1))
    result["color"] = _nearest(color, COLORS)

    # Soft alpha of every pixel along the background -> shape colour line; its half level is the
    # shape's edge whatever the contrast, blur or anti-aliasing.
    direction = color - background
    alpha = (pixels - background) @ direction / max(direction @ direction, 1e-6)
    mask = largest_component(((smooth - background) @ direction / max(direction @ direction, 1e-6) > 0.5)
                             & (distance > MIN_FOREGROUND_DISTANCE / 2))
    if mask.sum() < MIN_AREA_FRACTION * height * width:
        return result
    ys, xs = np.nonzero(mask)
    margin = max(3, int(np.ptp(ys) + np.ptp(xs)) // 6)
    window = (slice(max(ys.min() - margin, 0), ys.max() + margin + 1),
              slice(max(xs.min() - margin, 0), xs.max() + margin + 1))
    border_alpha = np.concatenate([alpha[:ring].ravel(), alpha[-ring:].ravel(), alpha[:, :ring].ravel(),
                                   alpha[:, -ring:].ravel()])
    noise = (1.4826 * np.median(np.abs(border_alpha - np.median(border_alpha)))) ** 2
    fits = _fit_shapes(alpha, window)
    result["fits"] = fits
    shape = min(fits, key=lambda name: fits[name]["error"])
    fit = fits[shape]
    if fit["error"] - noise > MAX_FIT_ERROR:
        return result
    result["position"] = _grid_position(np.array([fit["center_y"], fit["center_x"]]), height, width)
    half_extent = fit["half"] / np.sqrt(height * width)
    result["size"] = min(SIZES, key=lambda name: abs(SIZES[name] - half_extent))
    result["outline"] = outline_measures(alpha, window)
    if outline_accepted(shape, result["outline"]):  # a misshapen shape still has a place and a size
        result["shape"] = shape
    return result


def prompt_accuracy(images: Sequence[ImageLike], attributes_list: Sequence[dict[str, object]]) -> dict[str, float]:
    """Fraction of images whose detected attributes match the prompt's.

    Only single-shape prompts are scored (attributes with ``num_shapes`` 2 are skipped); an
    attribute that was not recognised (``None``) counts as wrong.

    Returns:
        dict with ``color_accuracy``, ``shape_accuracy``, ``background_accuracy``,
        ``position_accuracy``, ``size_accuracy`` and ``n`` (the number of scored images).
    """
    if len(images) != len(attributes_list):
        raise ValueError(f"Got {len(images)} images but {len(attributes_list)} attribute dicts.")
    hits = {key: 0 for key in _SCORED}
    n = 0
    for image, attrs in zip(images, attributes_list, strict=True):
        if int(attrs.get("num_shapes") or 1) != 1:
            continue
        detected = analyze_image(image)
        n += 1
        for key in _SCORED:
            hits[key] += detected[key] is not None and detected[key] == attrs.get(key)
    return {**{f"{key}_accuracy": (hits[key] / n if n else float("nan")) for key in _SCORED}, "n": n}
