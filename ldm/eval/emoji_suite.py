"""Prompt-following evaluation on the emoji data (``ldm.data.emoji``), scored with the project's own CLIP.

For every prompt of a set, one image (generator seeded ``seed + i``) and:

* retrieval: is the prompted concept the top-1 / in the top-5 of all concepts by image-text similarity (each concept
  = the mean of its captions' text embeddings; ``ldm.eval.clip_metrics.retrieval``);
* CLIP score of the image against the prompt, and of the real render of the same concept against the same prompt:
  ``clip_score_ratio`` = generated / real;
* an in-domain Fréchet distance between the generated images and the real renders in the CLIP's image-embedding
  space (not Inception FID);
* a breakdown of retrieval by emoji group (faces, animals, food, objects, flags, symbols, ...).

Sets: ``train`` (training concepts, prompted in their training style), ``heldout`` (the held-out Twemoji renders:
known concept x known style never seen together), ``natural`` (30 prompts a user would type).
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

#: Prompts a user would type -> the emoji label (emojibase CLDR) they ask for.
NATURAL_PROMPTS = {
    "a red fox": "fox", "a slice of pizza": "pizza", "a red apple": "red apple", "a cat face": "cat face",
    "a rocket": "rocket", "the sun": "sun", "a red heart": "red heart", "a pine tree": "evergreen tree",
    "a car": "automobile", "a smiling face with sunglasses": "smiling face with sunglasses",
    "a dog face": "dog face", "a banana": "banana", "a birthday cake": "birthday cake",
    "a cup of coffee": "hot beverage", "a snowman": "snowman", "a rainbow": "rainbow", "a star": "star",
    "a crescent moon": "crescent moon", "an airplane": "airplane", "a bicycle": "bicycle",
    "a soccer ball": "soccer ball", "a guitar": "guitar", "a light bulb": "light bulb", "a house": "house",
    "a penguin": "penguin", "a frog": "frog", "a watermelon": "watermelon",
    "a laughing face with tears of joy": "face with tears of joy", "a thumbs up": "thumbs up", "a fire": "fire",
}
SETS = ("train", "heldout", "natural")


def load_rows(data_dir: str | Path) -> dict[str, list[dict]]:
    """The metadata rows of every split of an emoji imagefolder, with ``path`` added."""
    out = {}
    for split in ("train", "validation", "test"):
        meta = Path(data_dir) / split / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()] if meta.is_file() else []
        out[split] = [dict(r, path=str(meta.parent / r["file_name"])) for r in rows]
    return out


def styled_prompt(row: dict) -> str:
    """The row's caption that names its style ("a fox emoji, Noto style"), else its first caption."""
    return next((c for c in row["text"] if c.endswith(" style")), row["text"][0])


def prompt_set(rows: dict[str, list[dict]], name: str, n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """(prompt, real row) pairs of a set; ``train`` / ``heldout`` sample ``n`` base renders (no skin variants)."""
    if name == "natural":
        by_label = {}
        for split_rows in rows.values():
            for r in split_rows:
                if r.get("variant", 0) == 0 and (r["label"] not in by_label or r["style"] == "Noto"):
                    by_label[r["label"]] = r
        return [(prompt, by_label[label]) for prompt, label in NATURAL_PROMPTS.items()]
    pool = [r for r in rows["train" if name == "train" else "test"] if r.get("variant", 0) == 0]
    pool = sorted(pool, key=lambda r: r["file_name"])
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [(styled_prompt(r), r) for r in picked]


def concepts(rows: dict[str, list[dict]]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """All concepts: hexcodes, one caption list each (both styles' captions), and hexcode -> group."""
    captions, groups = defaultdict(list), {}
    for split_rows in rows.values():
        for r in split_rows:
            captions[r["hexcode"]] += [c for c in r["text"] if c not in captions[r["hexcode"]]]
            groups[r["hexcode"]] = r["group"]
    hexcodes = sorted(captions)
    return hexcodes, [captions[h] for h in hexcodes], groups


def by_group(ranks: list[int], rows: list[dict], groups: dict[str, str]) -> dict:
    """Retrieval ranks (0 = found first) of ``rows`` -> {group: {n, top1, top5}}."""
    grouped = defaultdict(list)
    for rank, row in zip(ranks, rows):
        grouped[groups[row["hexcode"]]].append(rank)
    return {g: {"n": len(v), "top1": sum(k < 1 for k in v) / len(v), "top5": sum(k < 5 for k in v) / len(v)}
            for g, v in sorted(grouped.items())}


@torch.no_grad()
def generate(pipe, prompts: list[str], steps, guidance_scale, seed: int, batch_size: int) -> tuple[list, float]:
    """One PIL image per prompt (generator ``seed + i``), and the seconds per image."""
    images, start = [], time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        generators = [torch.Generator().manual_seed(seed + lo + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators).images
    return images, (time.perf_counter() - start) / max(1, len(prompts))


def score(clip, tokenizer, images, pairs: list[tuple[str, dict]], concept_emb, hexcodes, groups) -> dict:
    """The figures of one set (module docstring) for generated ``images`` of ``pairs``."""
    from PIL import Image

    from ..data.image_caption import image_to_tensor
    from .clip_metrics import clip_score, frechet_distance, image_embeddings, retrieval, text_embeddings

    size = clip.config.vision_config.image_size
    to_pixels = lambda ims: torch.stack([image_to_tensor(i.convert("RGB"), size) for i in ims])  # noqa: E731
    generated = image_embeddings(clip, to_pixels(images))
    real = image_embeddings(clip, to_pixels([Image.open(r["path"]) for _, r in pairs]))
    prompts = text_embeddings(clip, tokenizer, [p for p, _ in pairs])
    targets = torch.tensor([hexcodes.index(r["hexcode"]) for _, r in pairs])
    found = retrieval(generated, concept_emb, targets)
    real_found = retrieval(real, concept_emb, targets)
    gen_score, real_score = clip_score(generated, prompts), clip_score(real, prompts)
    return {
        "n": len(pairs), "top1": found["top1"], "top5": found["top5"],
        "real_top1": real_found["top1"], "real_top5": real_found["top5"],
        "clip_score": float(gen_score.mean()), "real_clip_score": float(real_score.mean()),
        "clip_score_ratio": float(gen_score.mean() / real_score.mean().clamp(min=1e-6)),
        "frechet_clip_distance": frechet_distance(generated, real) if len(pairs) > 2 else None,
        "by_group": by_group(found["ranks"], [r for _, r in pairs], groups),
        "per_prompt": [{"prompt": p, "label": r["label"], "rank": int(k)} for (p, r), k in zip(pairs, found["ranks"])],
    }


@torch.no_grad()
def render_retrieval(clip, tokenizer, data_dir, split: str, base_only: bool = True) -> dict:
    """The CLIP's own image -> concept retrieval on the real renders of a split (top-1 / top-5 over all concepts),
    overall and by group: how well it knows the concepts, before any generated image is scored with it."""
    from PIL import Image

    from ..data.image_caption import image_to_tensor
    from .clip_metrics import concept_embeddings, image_embeddings, retrieval

    rows = load_rows(data_dir)
    hexcodes, caption_lists, groups = concepts(rows)
    picked = [r for r in rows[split] if not base_only or r.get("variant", 0) == 0]
    size = clip.config.vision_config.image_size
    pixels = torch.stack([image_to_tensor(Image.open(r["path"]).convert("RGB"), size) for r in picked])
    found = retrieval(image_embeddings(clip, pixels), concept_embeddings(clip, tokenizer, caption_lists),
                      torch.tensor([hexcodes.index(r["hexcode"]) for r in picked]))
    return {"split": split, "n": len(picked), "top1": found["top1"], "top5": found["top5"],
            "by_group": by_group(found["ranks"], picked, groups)}


def pool_reports(reports: list[dict], sets=SETS) -> dict:
    """{set: the prompt-weighted mean of top-1, top-5, CLIP score ratio and seconds per image over several seeds'
    reports, ``n`` summed, and each seed's top-5}.

    One seed's 96 prompts resolve top-5 retrieval to about +-5 points (the binomial standard deviation at 70 %);
    three seeds (288 prompts, each seed drawing its own training and held-out concepts) to about +-3.
    """
    pooled = {}
    for name in sets:
        runs = [r[name] for r in reports if name in r]
        if not runs:
            continue
        n = sum(r["n"] for r in runs)
        means = {m: sum(r[m] * r["n"] for r in runs) / n
                 for m in ("top1", "top5", "clip_score_ratio", "seconds_per_image") if all(m in r for r in runs)}
        pooled[name] = {"n": n, **means, "top5_per_seed": [r["top5"] for r in runs]}
    return pooled


def evaluate_emoji(pipe, clip, tokenizer, data_dir, sets=SETS, num_prompts: int = 96, steps=None,
                   guidance_scale=None, seed: int = 0, batch_size: int = 16) -> dict:
    """{set: figures} for a pipeline (module docstring), plus the images per set under ``"images"``."""
    from .clip_metrics import concept_embeddings

    rows = load_rows(data_dir)
    hexcodes, caption_lists, groups = concepts(rows)
    concept_emb = concept_embeddings(clip, tokenizer, caption_lists)
    report, images = {}, {}
    for name in sets:
        pairs = prompt_set(rows, name, num_prompts, seed)
        images[name], seconds = generate(pipe, [p for p, _ in pairs], steps, guidance_scale, seed, batch_size)
        report[name] = score(clip, tokenizer, images[name], pairs, concept_emb, hexcodes, groups)
        report[name]["seconds_per_image"] = round(seconds, 4)
    report["images"] = images
    return report
