"""The shapes data set (determinism, held-out split, captions, datasets wrapper) and its analyser."""

import re
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ldm.data import shapes
from ldm.eval.shapes_analyzer import analyze_image, largest_component, prompt_accuracy


def _degrade(image: Image.Image, seed: int) -> Image.Image:
    """Gaussian blur (std 1 px) plus additive Gaussian noise (std 10/255)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, 10.0, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _single_shape_samples(num: int, resolution: int, seed: int = 11):
    samples = [shapes.render_sample(i, "validation", seed, resolution, two_shape_fraction=0.0) for i in range(num)]
    return [image for image, _, _ in samples], [attrs for _, _, attrs in samples]


def _has_word(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


# ----------------------------------------------------------------------------- data set


def test_same_seed_and_index_render_identically_and_others_differ():
    image, caption, attrs = shapes.render_sample(7, "train", seed=3)
    again, caption_again, attrs_again = shapes.render_sample(7, "train", seed=3)
    assert image.tobytes() == again.tobytes() and caption == caption_again and attrs == attrs_again
    assert image.size == (64, 64) and image.mode == "RGB"
    for other in (shapes.render_sample(8, "train", seed=3), shapes.render_sample(7, "train", seed=4),
                  shapes.render_sample(7, "validation", seed=3)):
        assert other[0].tobytes() != image.tobytes()
    # Position/size jitter: even samples with equal attributes are distinct images.
    assert len({shapes.render_sample(i, "train", seed=0)[0].tobytes() for i in range(200)}) == 200


@pytest.mark.parametrize("resolution", [32, 48, 256])
def test_render_resolution(resolution):
    image, _, _ = shapes.render_sample(0, resolution=resolution)
    assert image.size == (resolution, resolution)


def test_heldout_triples_are_a_valid_fraction_of_all_triples():
    assert set(shapes.HELDOUT_TRIPLES) <= set(shapes.VALID_TRIPLES)
    assert 0.10 <= len(shapes.HELDOUT_TRIPLES) / len(shapes.VALID_TRIPLES) <= 0.15
    for color, _, background in shapes.VALID_TRIPLES:
        assert np.linalg.norm(np.subtract(shapes.COLORS[color], shapes.BACKGROUNDS[background])) >= shapes.MIN_CONTRAST


def test_training_never_shows_a_heldout_triple_but_covers_every_attribute():
    heldout = set(shapes.HELDOUT_TRIPLES)
    seen = set()
    for index in range(3000):
        _, attrs = shapes.sample_attributes(index, "train", seed=0)
        triples = [(attrs["color"], attrs["shape"], attrs["background"])]
        if attrs["num_shapes"] == 2:
            triples.append((attrs["color2"], attrs["shape2"], attrs["background"]))
        assert not heldout & set(triples), (index, attrs)
        seen.update(triples)
    assert {c for c, _, _ in seen} == set(shapes.COLORS)
    assert {s for _, s, _ in seen} == set(shapes.SHAPES)
    assert {b for _, _, b in seen} == set(shapes.BACKGROUNDS)
    assert {(c, s) for c, s, _ in seen} == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
    assert seen == set(shapes.TRAIN_TRIPLES)


def test_heldout_split_uses_only_heldout_triples_with_one_shape():
    prompts = shapes.heldout_prompts(300, seed=5)
    assert prompts == shapes.heldout_prompts(300, seed=5)
    triples = [(a["color"], a["shape"], a["background"]) for _, a in prompts]
    assert set(triples) == set(shapes.HELDOUT_TRIPLES)
    assert all(a["num_shapes"] == 1 and a["color2"] is None for _, a in prompts)
    assert [c for c, _ in prompts[:5]] == [shapes.render_sample(i, "heldout", seed=5)[1] for i in range(5)]


def test_two_shape_fraction():
    def counts(fraction):
        return Counter(shapes.sample_attributes(i, "train", 0, fraction)[1]["num_shapes"] for i in range(2000))

    assert counts(0.0) == {1: 2000}
    assert counts(1.0) == {2: 2000}
    assert 0.2 <= counts(0.25)[2] / 2000 <= 0.3
    for index in range(200):
        _, attrs = shapes.sample_attributes(index, "train", 0, two_shape_fraction=1.0)
        (r1, c1), (r2, c2) = shapes.POSITIONS[attrs["position"]], shapes.POSITIONS[attrs["position2"]]
        assert max(abs(r1 - r2), abs(c1 - c2)) == 2 and attrs["color"] != attrs["color2"]


def test_captions_name_the_colour_shape_and_background_of_every_shape():
    for split in ("train", "heldout"):
        for index in range(1500):
            caption, attrs = shapes.sample_attributes(index, split, seed=2, two_shape_fraction=0.5)
            assert _has_word(caption, attrs["background"] + " background"), caption
            for suffix in ("", "2")[: attrs["num_shapes"]]:
                assert _has_word(caption, f"{attrs['color' + suffix]} {attrs['shape' + suffix]}"), caption
            if not _has_word(caption, shapes.POSITION_PHRASES[attrs["position"]]):
                assert not any(_has_word(caption, p) for p in shapes.POSITION_PHRASES.values()), caption


def test_caption_corpus_covers_the_vocabulary():
    corpus = [shapes.sample_attributes(i, "train", 0)[0] for i in range(500)]
    words = set(" ".join(corpus).replace(",", " ").split())
    phrase_words = {w for p in shapes.POSITION_PHRASES.values() for w in p.split()}
    assert {*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES, *shapes.BACKGROUNDS, *phrase_words} <= words


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="split"):
        shapes.render_sample(0, split="test")
    with pytest.raises(ValueError, match="resolution"):
        shapes.render_sample(0, resolution=8)
    with pytest.raises(ValueError, match="two_shape_fraction"):
        shapes.load_shapes_dataset(num_samples=4, two_shape_fraction=1.5)


def test_load_shapes_dataset(tmp_path):
    ds = shapes.load_shapes_dataset("train", num_samples=24, resolution=48, seed=1, two_shape_fraction=0.5,
                                    cache_dir=str(tmp_path))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 24
    assert ds.column_names == ["image", "text", *shapes.ATTRIBUTE_COLUMNS]
    assert isinstance(ds.features["image"], datasets.Image)
    for index, row in enumerate(ds):
        image, caption, attrs = shapes.render_sample(index, "train", 1, 48, two_shape_fraction=0.5)
        assert row["image"].size == (48, 48)
        assert row["image"].convert("RGB").tobytes() == image.tobytes()  # PNG is lossless
        assert row["text"] == caption and {k: row[k] for k in attrs} == attrs
    assert {row["num_shapes"] for row in ds} == {1, 2}
    heldout = shapes.load_shapes_dataset("heldout", num_samples=16, resolution=32, cache_dir=str(tmp_path))
    assert all((r["color"], r["shape"], r["background"]) in shapes.HELDOUT_TRIPLES for r in heldout)
    assert all(r["shape2"] is None for r in heldout)


# ----------------------------------------------------------------------------- analyser


def test_largest_component_uses_4_connectivity():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:3, 0:3] = True  # 9 pixels
    mask[3, 3] = True  # touches the block only diagonally
    mask[5:8, 4:8] = True  # 12 pixels
    assert largest_component(mask).sum() == 12 and largest_component(mask)[6, 5]
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyzer_recognises_ground_truth_renders(resolution):
    images, attrs = _single_shape_samples(300, resolution)
    clean = prompt_accuracy(images, attrs)
    degraded = prompt_accuracy([_degrade(im, i) for i, im in enumerate(images)], attrs)
    assert clean["n"] == degraded["n"] == 300
    for key in ("color_accuracy", "shape_accuracy", "background_accuracy"):
        assert clean[key] >= 0.98, clean
        assert degraded[key] >= 0.9, degraded


def _deformed(kind: str, amount: float, size: str, position: str, blur: float, noise: float, seed: int = 0,
              color: str = "red", background: str = "white") -> Image.Image:
    """A shape a person would not call the prompt's: drawn at the data's supersampling, box-downsampled to 64 px,
    blurred and noised. ``rounded``/``pinched`` squares (corner radius / side indentation in half-extents),
    ``ellipse`` (axis ratio), ``teardrop`` (a circle with a point ``amount`` half-extents out), ``blob`` (a
    wobbly circle)."""
    scale = shapes.SUPERSAMPLING
    canvas = Image.new("RGB", (64 * scale, 64 * scale), shapes.BACKGROUNDS[background])
    draw, fill = ImageDraw.Draw(canvas), shapes.COLORS[color]
    row, col = shapes.POSITIONS[position]
    cx, cy = shapes.GRID_CENTERS[col] * 64 * scale, shapes.GRID_CENTERS[row] * 64 * scale
    h = shapes.SIZES[size] * 64 * scale
    if kind == "rounded":
        draw.rounded_rectangle((cx - h, cy - h, cx + h, cy + h), radius=amount * h, fill=fill)
    elif kind == "pinched":  # corners and inward-pulled side midpoints
        corners = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
        points = []
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            norm = np.hypot(cx - mx, cy - my)
            points += [(x0, y0), (mx + (cx - mx) / norm * amount * h, my + (cy - my) / norm * amount * h)]
        draw.polygon(points, fill=fill)
    elif kind == "ellipse":
        a = np.sqrt(amount)
        draw.ellipse((cx - h * a, cy - h / a, cx + h * a, cy + h / a), fill=fill)
    elif kind == "teardrop":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        tip, angle = h * (1 + amount), np.arccos(1 / (1 + amount))
        draw.polygon([(cx + tip, cy), (cx + h * np.cos(angle), cy - h * np.sin(angle)),
                      (cx + h * np.cos(angle), cy + h * np.sin(angle))], fill=fill)
    else:  # blob
        theta = np.linspace(0, 2 * np.pi, 200, endpoint=False)
        r = h * (1 + amount * np.sin(3 * theta + 0.7) + amount / 2 * np.sin(5 * theta + 2))
        draw.polygon(list(zip(cx + r * np.cos(theta), cy + r * np.sin(theta))), fill=fill)
    image = canvas.resize((64, 64), Image.Resampling.BOX)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64) + np.random.default_rng(seed).normal(0, noise, (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


_CONDITIONS = [(size, position, blur, noise) for size in ("small", "medium", "large")
               for position in ("center", "top left") for blur in (0.0, 0.7) for noise in (0.0, 8.0)]


@pytest.mark.parametrize("kind, amount, floor", [
    ("pinched", 0.2, 0.9), ("rounded", 0.8, 0.9), ("ellipse", 1.25, 0.95), ("teardrop", 0.5, 0.95),
    ("blob", 0.15, 0.95)])
def test_analyzer_is_as_strict_as_a_person_on_deformed_shapes(kind, amount, floor):
    """Pinched and strongly rounded squares are no square; ovals, teardrops and blobs no circle (the floors sit
    below the rejection measured on these 24 renders)."""
    meant = "square" if kind in ("pinched", "rounded") else "circle"
    found = [analyze_image(_deformed(kind, amount, *c, seed=i))["shape"] for i, c in enumerate(_CONDITIONS)]
    assert np.mean([f != meant for f in found]) >= floor, found


def test_analyzer_agrees_with_a_person_on_the_bundled_teachers_outputs():
    """16 images of models/shapes-teacher (the first 16 held-out prompts, 50 DDIM steps, guidance 4, seed i)
    judged by eye at 4x zoom (tests/fixtures/shapes-by-eye/labels.json): 8 show the prompt's shape, 8 domes,
    teardrops and pinched triangles. The old analyser accepted all 16."""
    import json
    from pathlib import Path

    folder = Path(__file__).parent / "fixtures" / "shapes-by-eye"
    labels = json.loads((folder / "labels.json").read_text())
    agree = [(analyze_image(Image.open(folder / row["file"]))["shape"] == row["shape"]) == row["by_eye"]
             for row in labels]
    assert sum(agree) >= 15, [row["file"] for row, ok in zip(labels, agree) if not ok]


def test_analyzer_keeps_every_clean_shape_blurred_or_noisy():
    for shape in shapes.SHAPES:
        for i, (size, position, blur, noise) in enumerate(_CONDITIONS + [("small", "center", 1.5, 8.0),
                                                                          ("large", "center", 1.5, 8.0)]):
            image = shapes.render_attributes({"shape": shape, "color": "yellow", "background": "black",
                                              "position": position, "size": size}, 64, jitter_seed=i)
            image = image.filter(ImageFilter.GaussianBlur(blur)) if blur else image
            pixels = np.asarray(image, dtype=np.float64) + np.random.default_rng(i).normal(0, noise, (64, 64, 3))
            found = analyze_image(np.clip(pixels, 0, 255).round().astype(np.uint8))
            assert (found["shape"], found["size"]) == (shape, size), (shape, size, position, blur, noise)


def test_analyzer_accepts_large_pil_and_float_array_images():
    for index in range(20):
        image, _, attrs = shapes.render_sample(index, "heldout", seed=4, resolution=256)
        for version in (image, np.asarray(image, dtype=np.float32) / 255):
            found = analyze_image(version)
            assert [found[k] for k in ("color", "shape", "background")] == [
                attrs["color"], attrs["shape"], attrs["background"]]
    with pytest.raises(ValueError, match="HxWx3"):
        analyze_image(np.zeros((3, 32, 32), dtype=np.uint8))


def test_analyzer_answers_none_without_a_shape():
    rng = np.random.default_rng(0)
    noise = analyze_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert noise["shape"] is None and noise["color"] is None and noise["background"] is None
    blank = analyze_image(Image.new("RGB", (64, 64), shapes.BACKGROUNDS["gray"]))
    assert blank["shape"] is None and blank["color"] is None and blank["background"] == "gray"
    red = shapes.COLORS["red"]
    for draw_fn in (lambda d: d.line([(5, 5), (60, 50)], fill=red, width=3),  # a line
                    lambda d: d.ellipse([10, 10, 50, 50], outline=red, width=4),  # a ring
                    lambda d: (d.rectangle([28, 8, 36, 56], fill=red), d.rectangle([8, 28, 56, 36], fill=red))):
        image = Image.new("RGB", (64, 64), shapes.BACKGROUNDS["white"])
        draw_fn(ImageDraw.Draw(image))
        found = analyze_image(image)
        assert found["shape"] is None and found["color"] == "red"


def test_prompt_accuracy_is_low_for_wrong_labels():
    images, attrs = _single_shape_samples(60, 64, seed=12)
    wrong = []
    for a in attrs:
        colors = [c for c in shapes.COLORS if c != a["color"]]
        kinds = [s for s in shapes.SHAPES if s != a["shape"]]
        wrong.append({**a, "color": colors[0], "shape": kinds[0]})
    scores = prompt_accuracy(images, wrong)
    assert scores["color_accuracy"] == 0.0 and scores["shape_accuracy"] == 0.0
    assert scores["background_accuracy"] == 1.0
    shuffled = prompt_accuracy(images, attrs[1:] + attrs[:1])
    assert shuffled["color_accuracy"] < 0.4 and shuffled["shape_accuracy"] < 0.6


def test_prompt_accuracy_scores_single_shape_prompts_only():
    two, _, two_attrs = shapes.render_sample(0, "train", two_shape_fraction=1.0)
    one, _, one_attrs = shapes.render_sample(0, "train", two_shape_fraction=0.0)
    assert prompt_accuracy([two, one], [two_attrs, one_attrs])["n"] == 1
    with pytest.raises(ValueError, match="images"):
        prompt_accuracy([one], [one_attrs, one_attrs])


def _shape_word_identity_ratio(text_encoder, tokenizer) -> float:
    """RMS spread of the shape word's final state across shapes / across (colour, background) contexts."""
    import torch

    colors, backgrounds = list(shapes.COLORS), list(shapes.BACKGROUNDS)
    captions = [f"a {c} {s} on a {b} background" for c in colors for s in shapes.SHAPES for b in backgrounds]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state  # (C*S*B, 77, width)
    word = states[:, 3].reshape(len(colors), len(shapes.SHAPES), len(backgrounds), -1)  # <bos> a <colour> <shape>
    word = word - word.mean((0, 1, 2))
    by_shape = word.mean((0, 2), keepdim=True)
    return (by_shape.pow(2).sum(-1).mean().sqrt() / (word - by_shape).pow(2).sum(-1).mean().sqrt()).item()


def test_text_encoder_token_std_keeps_each_word_identity():
    """The bundled encoder's recipe: at CLIP's 0.02 init the colour word moves the shape word's state more than
    the shape does; token embeddings at std 1 make the shape dominate."""
    from ldm.tiny import tiny_text_encoder
    from ldm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    clip_init = _shape_word_identity_ratio(tiny_text_encoder(tokenizer, 128, 0, 4, 4), tokenizer)
    wide = _shape_word_identity_ratio(tiny_text_encoder(tokenizer, 128, 0, 4, 4, token_embedding_std=1.0), tokenizer)
    assert clip_init < 1.0 < 3.0 < wide
