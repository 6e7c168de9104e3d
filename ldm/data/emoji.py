"""Emoji renders from public npm packages as a text-to-image ``imagefolder``.

    python -m ldm.data.emoji --out data/emoji                 # fetches the pinned tarballs with `npm pack`
    python -m ldm.data.emoji --out data/emoji --tarball google=PATH --tarball twitter=PATH --tarball emojibase=PATH

Sources (pinned versions; each tarball's sha512 is checked against the registry's ``dist.integrity``):

* ``emoji-datasource-google@16.0.0``: Noto Emoji renders, 64 x 64 RGBA (Apache-2.0).
* ``emoji-datasource-twitter@16.0.0``: Twemoji renders, the same layout (CC-BY-4.0; attribute "Twemoji by Twitter").
* ``emojibase-data@17.0.0``: the CLDR label ("fox", "red apple") and tags of every hexcode (MIT).

Every concept (a base emoji; its skin-tone variants are folded in as further images of the same concept) gets a list
of captions from its label, name, short names and tags ("fox", "a fox", "a fox emoji", "fox, animal, face",
"a fox emoji, Noto style", ...). RGBA is composited onto white. The output is a standard ``datasets`` imagefolder
with one folder per split, each with its PNGs and a ``metadata.jsonl`` (columns ``file_name``, ``text`` (a list of
captions), ``style``, ``hexcode``, ``group``, ``label``, ``split``):

* ``test``: the Twemoji renders of every 10th concept (sorted by hexcode); their Noto renders stay in ``train``. It
  asks for a known concept in a known style that was never seen together.
* ``validation``: the Noto renders of every 20th concept (offset 5), whose Twemoji renders stay in ``train``.
* ``train``: everything else.

``--default_style Noto`` makes unstyled prompts mean one style: every training caption of the other style's renders
that names no style gets ", Twemoji style" appended, position for position (a caption that becomes a duplicate keeps
its draw), so the caption without a style word is Noto's alone. The ``test`` and ``validation`` captions stay as
they are, so evaluation prompts and concept embeddings do not depend on it.

``load_dataset("imagefolder", data_dir=OUT)`` gives the three splits; ``train_t2i.py --train_data_dir OUT`` trains on
``train`` and draws one caption of the list per step.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # npm's dist.integrity: "sha512-<base64>"

    @property
    def tarball_name(self) -> str:
        return f"{self.name.replace('@', '').replace('/', '-')}-{self.version}.tgz"


PACKAGES = {
    "google": Package("emoji-datasource-google", "16.0.0", "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3"
                      "l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "twitter": Package("emoji-datasource-twitter", "16.0.0", "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTz"
                       "a6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "emojibase": Package("emojibase-data", "17.0.0", "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882L"
                         "TpmEpyhBNEC0m2SEmItljHsTygjA=="),
}
STYLES = {"google": "Noto", "twitter": "Twemoji"}  # tarball key -> style name in captions and the ``style`` column
LICENSES = {"google": "Apache-2.0 (Noto Emoji, Google)", "twitter": "CC-BY-4.0 (Twemoji, Twitter)",
            "emojibase": "MIT (emojibase-data)"}
GROUPS = {"Smileys & Emotion": "faces", "People & Body": "people", "Animals & Nature": "animals",
          "Food & Drink": "food", "Travel & Places": "travel", "Activities": "activities", "Objects": "objects",
          "Symbols": "symbols", "Flags": "flags"}  # "Component" (skin-tone swatches, hair parts) is left out
HELDOUT_EVERY, VALIDATION_EVERY, VALIDATION_OFFSET = 10, 20, 5


# ------------------------------------------------------------------------------------------------ tarballs
def check_integrity(path: Path, integrity: str) -> None:
    """Raise ``OSError`` unless the file's sha512 equals npm's ``integrity`` ("sha512-<base64>")."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise ValueError(f"Only sha512 integrity strings are supported, got {integrity[:20]}...")
    digest = base64.b64encode(hashlib.sha512(Path(path).read_bytes()).digest()).decode()
    if digest != expected:
        raise OSError(f"{path} does not match its pinned sha512 integrity ({integrity[:24]}...): the tarball is "
                      "truncated or tampered with. Delete it and fetch it again (npm pack NAME@VERSION).")


def fetch(package: Package, cache_dir: Path) -> Path:
    """The package's tarball in ``cache_dir`` (fetched with ``npm pack`` when absent), integrity-checked."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / package.tarball_name
    if not path.is_file():
        if shutil.which("npm") is None:
            raise OSError(f"{path} is missing and npm is not installed: download "
                          f"https://registry.npmjs.org/{package.name}/-/{package.name.split('/')[-1]}-"
                          f"{package.version}.tgz there, or install npm.")
        subprocess.run(["npm", "pack", f"{package.name}@{package.version}", "--pack-destination", str(cache_dir)],
                       check=True, capture_output=True)
    check_integrity(path, package.integrity)
    return path


def read_members(path: Path, wanted) -> dict[str, bytes]:
    """{member name: bytes} of the regular files of a tarball whose name ``wanted(name)`` accepts."""
    out = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and wanted(member.name):
                out[member.name] = tar.extractfile(member).read()
    return out


# ------------------------------------------------------------------------------------------------ concepts
@dataclass
class Concept:
    """One base emoji: its CLDR label and tags, emoji-datasource names, group, and image files per style."""

    hexcode: str
    label: str
    name: str
    short_names: list[str]
    tags: list[str]
    group: str
    images: dict[str, list[str]] = field(default_factory=dict)  # style key -> file names (base first, then skins)


def _key(hexcode: str) -> str:
    return hexcode.upper().replace("-FE0F", "")


def load_concepts(datasource: list[dict], emojibase: list[dict]) -> list[Concept]:
    """Concepts sorted by hexcode, from emoji-datasource's ``emoji.json`` and emojibase's ``en/data.json``."""
    labels = {_key(e["hexcode"]): e for e in emojibase}
    concepts = []
    for entry in datasource:
        group = GROUPS.get(entry.get("category"))
        base = labels.get(_key(entry["unified"])) or labels.get(_key(entry.get("non_qualified") or ""))
        if group is None or base is None:
            continue
        files = {}
        for style in STYLES:
            names = [entry["image"]] if entry.get(f"has_img_{style}") else []
            names += [v["image"] for v in (entry.get("skin_variations") or {}).values() if v.get(f"has_img_{style}")]
            files[style] = names
        concepts.append(Concept(entry["unified"], base["label"], (entry.get("name") or "").lower(),
                                list(entry.get("short_names") or []), list(base.get("tags") or []), group, files))
    return sorted(concepts, key=lambda c: c.hexcode)


def _article(phrase: str) -> str:
    """"fox" -> "a fox", "apple" -> "an apple"; a phrase that already starts with "the" is kept."""
    if phrase.startswith("the "):
        return phrase
    vowel = phrase[:1] in "aeiou" and not phrase.startswith(("one", "uni", "use", "eu"))
    return ("an " if vowel else "a ") + phrase


def captions(concept: Concept, style: str) -> list[str]:
    """The caption list of one render: label, with an article, as an emoji, with tags, with the style, ..."""
    label = concept.label.lower()
    if label.startswith("flag: "):  # "flag: Germany" -> "the flag of germany"
        phrases = [f"the flag of {label[6:]}", f"{label[6:]} flag"]
    else:
        phrases = [label.replace(": ", " ")]
    names = [concept.name, *(n.replace("_", " ") for n in concept.short_names)]
    phrases += [n for n in names if len(n) > 3 and n not in phrases and not re.search(r"[^a-z0-9 '&.-]", n)]
    main = phrases[0]
    the = main if main.startswith("the ") else f"the {main}"
    out = [main, _article(main), f"{_article(main)} emoji", the, f"{_article(main)} emoji, {STYLES[style]} style"]
    tags = [t.lower() for t in concept.tags if t.lower() not in main.split()][:5]
    if tags:
        out.append(", ".join([main, *tags]))
    out += [_article(p) for p in phrases[1:3]]
    return list(dict.fromkeys(out))  # unique, in order


def restyled(captions_: list[str], style: str, default_style: str | None) -> list[str]:
    """``captions_`` of a ``style`` render when unstyled captions mean ``default_style`` (a key of ``STYLES``): each
    caption naming no style gets the render's style appended, position for position; unchanged for the default."""
    if default_style is None or style == default_style:
        return captions_
    return [c if "style" in c else f"{c}, {STYLES[style]} style" for c in captions_]


def split_of(index: int, style: str) -> str:
    """The split of concept ``index`` (sorted by hexcode) in ``style``: see the module docstring."""
    if index % HELDOUT_EVERY == 0 and style == "twitter":
        return "test"
    if index % VALIDATION_EVERY == VALIDATION_OFFSET and style == "google":
        return "validation"
    return "train"


# ------------------------------------------------------------------------------------------------ images
def on_white(png: bytes) -> Image.Image:
    """RGBA (or palette / grey with transparency) PNG bytes -> RGB composited onto white."""
    image = Image.open(io.BytesIO(png))
    image.load()
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def build(out: Path, tarballs: dict[str, Path], size: int = 64, default_style: str | None = None) -> dict:
    """Write the imagefolder (module docstring) from the three tarballs; returns counts per split and style.
    ``default_style`` (a key of ``STYLES``): the style unstyled training captions mean (:func:`restyled`)."""
    meta = json.loads(read_members(tarballs["emojibase"], lambda n: n == "package/en/data.json")
                      ["package/en/data.json"])
    datasource = json.loads(read_members(tarballs["google"], lambda n: n == "package/emoji.json")
                            ["package/emoji.json"])
    concepts = load_concepts(datasource, meta)
    if out.exists():
        shutil.rmtree(out)
    rows: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for style in STYLES:
        prefix = f"package/img/{style}/{size}/"
        pngs = read_members(tarballs[style], lambda n: n.startswith(prefix) and n.endswith(".png"))
        for index, concept in enumerate(concepts):
            split = split_of(index, style)
            for variant, name in enumerate(concept.images[style]):
                if prefix + name not in pngs:
                    continue
                file_name = f"{style}-{concept.hexcode.lower()}" + (f"-{variant}" if variant else "") + ".png"
                (out / split).mkdir(parents=True, exist_ok=True)
                on_white(pngs[prefix + name]).save(out / split / file_name)
                text = captions(concept, style)
                text = restyled(text, style, default_style) if split == "train" else text
                rows[split].append({"file_name": file_name, "text": text, "style": STYLES[style],
                                    "hexcode": concept.hexcode, "group": concept.group, "label": concept.label,
                                    "split": split, "variant": variant})
    counts = {}
    for split, split_rows in rows.items():
        with open(out / split / "metadata.jsonl", "w") as f:
            for row in split_rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = {STYLES[s]: sum(r["style"] == STYLES[s] for r in split_rows) for s in STYLES}
    summary = {"concepts": len(concepts), "images": counts,
               **({"default_style": STYLES[default_style]} if default_style else {}),
               "sources": {k: f"{p.name}@{p.version}" for k, p in PACKAGES.items()}, "licenses": LICENSES}
    (out / "dataset_info.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Build the emoji text-to-image imagefolder from npm tarballs.")
    p.add_argument("--out", default="data/emoji")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "ldm" / "npm"),
                   help="where the tarballs are kept (fetched with npm pack when missing)")
    p.add_argument("--tarball", action="append", default=[], metavar="KEY=PATH",
                   help=f"use a local tarball for one of {sorted(PACKAGES)} (its integrity is still checked)")
    p.add_argument("--integrity", action="append", default=[], metavar="KEY=SHA512",
                   help="expect another integrity string (for a package version other than the pinned one)")
    p.add_argument("--default_style", choices=sorted(STYLES.values()), default=None,
                   help="the style unstyled training captions mean: the other style's training captions all name "
                        "their style (default: none, every render has unstyled captions)")
    args = p.parse_args(argv)
    local = dict(item.split("=", 1) for item in args.tarball)
    integrity = dict(item.split("=", 1) for item in args.integrity)
    tarballs = {}
    for key, package in PACKAGES.items():
        if key in integrity:
            package = Package(package.name, package.version, integrity[key])
        if key in local:
            check_integrity(Path(local[key]), package.integrity)
            tarballs[key] = Path(local[key])
        else:
            tarballs[key] = fetch(package, Path(args.cache_dir))
    default = next((k for k, v in STYLES.items() if v == args.default_style), None)
    summary = build(Path(args.out), tarballs, default_style=default)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
