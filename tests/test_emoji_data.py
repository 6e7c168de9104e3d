"""``ldm.data.emoji`` on fixture tarballs of the npm packages' layout (built here; no network)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import emoji

CONCEPTS = [  # (unified, name, short name, category, emojibase label, tags, skin variants)
    (f"1F{0x600 + i:03X}", f"THING {i}", f"thing_{i}", cat, f"thing {i}", ["tag", f"t{i}"], skins)
    for i, (cat, skins) in enumerate([("Animals & Nature", 0), ("Food & Drink", 2), ("Objects", 0),
                                      ("Smileys & Emotion", 0), ("Flags", 0), ("Symbols", 0),
                                      ("People & Body", 0), ("Activities", 0), ("Travel & Places", 0),
                                      ("Objects", 0), ("Animals & Nature", 0), ("Component", 0)])
] + [(f"1F{0x700 + i:03X}", f"MORE {i}", f"more_{i}", "Objects", f"more {i}", ["x"], 0) for i in range(10)]


def png(color, alpha=255) -> bytes:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (*color, alpha)  # a square of `color`, transparent around it
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def tarball(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("npm")
    datasource, emojibase, integrity, paths = [], [], {}, {}
    for unified, name, short, cat, label, tags, skins in CONCEPTS:
        skin_variations = {f"1F3F{b}": {"unified": f"{unified}-1F3F{b}", "image": f"{unified.lower()}-1f3f{b}.png",
                                        "has_img_google": True, "has_img_twitter": True} for b in "BC"[:skins]}
        datasource.append({"unified": unified, "name": name, "short_names": [short], "category": cat,
                           "image": f"{unified.lower()}.png", "has_img_google": True, "has_img_twitter": True,
                           "skin_variations": skin_variations or None})
        emojibase.append({"hexcode": unified, "label": label, "tags": tags})
    for style, color in (("google", (255, 0, 0)), ("twitter", (0, 0, 255))):
        files = {"emoji.json": json.dumps(datasource).encode()}
        for entry in datasource:
            files[f"img/{style}/64/{entry['image']}"] = png(color, 128 if "1F601" in entry["unified"] else 255)
            for skin in (entry["skin_variations"] or {}).values():
                files[f"img/{style}/64/{skin['image']}"] = png(color)
        paths[style] = root / f"{style}.tgz"
        integrity[style] = tarball(paths[style], files)
    paths["emojibase"] = root / "emojibase.tgz"
    integrity["emojibase"] = tarball(paths["emojibase"], {"en/data.json": json.dumps(emojibase).encode()})
    out = root / "emoji"
    argv = ["--out", str(out)] + [f"--tarball={k}={p}" for k, p in paths.items()] + \
        [f"--integrity={k}={v}" for k, v in integrity.items()]
    summary = emoji.main(argv)
    return {"out": out, "paths": paths, "integrity": integrity, "summary": summary}


def rows(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]


def test_splits_hold_out_twemoji_of_every_10th_concept_and_keep_its_noto(fixture):
    out = fixture["out"]
    train, test, val = rows(out, "train"), rows(out, "test"), rows(out, "validation")
    concepts = sorted(c[0] for c in CONCEPTS if c[3] != "Component")  # the component is left out
    assert fixture["summary"]["concepts"] == len(concepts) == 21
    assert {r["hexcode"] for r in test} == {concepts[0], concepts[10], concepts[20]}
    assert {r["style"] for r in test} == {"Twemoji"} and {r["style"] for r in val} == {"Noto"}
    assert {r["hexcode"] for r in val} == {concepts[5]}
    train_pairs = {(r["hexcode"], r["style"]) for r in train}
    for r in test + val:  # never trained in that style, always in the other one
        assert (r["hexcode"], r["style"]) not in train_pairs
        assert (r["hexcode"], "Noto" if r["style"] == "Twemoji" else "Twemoji") in train_pairs
    assert len(train) + len(test) + len(val) == 2 * (21 + 2)  # two styles, 21 concepts + 2 skin-tone images


def test_skin_tones_fold_into_their_base_concept(fixture):
    food = [r for r in rows(fixture["out"], "train") if r["hexcode"] == "1F601" and r["style"] == "Noto"]
    assert sorted(r["variant"] for r in food) == [0, 1, 2]
    assert len({json.dumps(r["text"]) for r in food}) == 1 and food[0]["group"] == "food"


def test_captions_are_a_list_from_label_name_and_tags(fixture):
    row = next(r for r in rows(fixture["out"], "train") if r["hexcode"] == "1F600" and r["style"] == "Noto")
    assert row["text"][:4] == ["thing 0", "a thing 0", "a thing 0 emoji", "the thing 0"]
    assert "a thing 0 emoji, Noto style" in row["text"] and "thing 0, tag, t0" in row["text"]
    assert row["label"] == "thing 0" and row["group"] == "animals"
    assert emoji.captions(emoji.Concept("1F1E9-1F1EA", "flag: Germany", "", [], ["flag"], "flags"), "google")[0] \
        == "the flag of germany"
    assert emoji._article("apple") == "an apple" and emoji._article("one") == "a one"


def test_a_default_style_makes_every_other_style_training_caption_name_its_style(fixture, tmp_path):
    argv = ["--out", str(tmp_path / "noto"), "--default_style", "Noto"] + \
        [f"--tarball={k}={p}" for k, p in fixture["paths"].items()] + \
        [f"--integrity={k}={v}" for k, v in fixture["integrity"].items()]
    assert emoji.main(argv)["default_style"] == "Noto" and "default_style" not in fixture["summary"]
    for split in ("train", "validation", "test"):
        plain, styled = rows(fixture["out"], split), rows(tmp_path / "noto", split)
        assert [r["file_name"] for r in plain] == [r["file_name"] for r in styled]
        for a, b in zip(plain, styled):
            if split != "train" or a["style"] == "Noto":  # the default style and the evaluation splits: as built
                assert a == b
                continue
            assert len(b["text"]) == len(a["text"]) and all(c.endswith(", Twemoji style") for c in b["text"])
            assert b["text"][0] == a["text"][0] + ", Twemoji style" and a["text"][4] == b["text"][4]


def test_alpha_is_composited_onto_white(fixture):
    out = fixture["out"]
    opaque = np.asarray(Image.open(out / "train" / "google-1f600.png"))
    half = np.asarray(Image.open(out / "train" / "google-1f601.png"))
    assert opaque.shape == (64, 64, 3)
    assert (opaque[0, 0] == 255).all() and tuple(opaque[32, 32]) == (255, 0, 0)  # transparent -> white
    assert tuple(half[32, 32]) == (255, 127, 127) or tuple(half[32, 32]) == (255, 128, 128)  # 50 % red on white


def test_the_splits_load_as_a_standard_imagefolder(fixture):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(fixture["out"]))
    assert set(ds) == {"train", "validation", "test"}
    assert isinstance(ds["train"][0]["text"], list) and ds["test"][0]["split"] == "test"


def test_a_tampered_or_truncated_tarball_is_refused(fixture, tmp_path):
    good = fixture["paths"]["emojibase"]
    truncated = tmp_path / "truncated.tgz"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(OSError, match="truncated or tampered"):
        emoji.check_integrity(truncated, fixture["integrity"]["emojibase"])
    with pytest.raises(OSError, match="truncated or tampered"):  # the pinned integrity of the real package
        emoji.main(["--out", str(tmp_path / "x"), f"--tarball=emojibase={good}",
                    f"--tarball=google={fixture['paths']['google']}",
                    f"--tarball=twitter={fixture['paths']['twitter']}"])
