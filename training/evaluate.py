#!/usr/bin/env python
"""Evaluate a LatentPipeline: the shapes suite (colour/shape/background accuracy) or the emoji suite (CLIP retrieval).

    python training/evaluate.py --model models/shapes-teacher --split heldout --num_prompts 96 --steps 50
    python training/evaluate.py --suite emoji --model models/emoji --clip models/emoji-clip --data_dir data/emoji

The emoji suite (``ldm.eval.emoji_suite``) scores every prompt of the training, held-out and natural sets with the
project's CLIP: retrieval top-1/top-5 of the prompted concept, CLIP score against the real render's, an in-domain
Fréchet distance in the CLIP's image space, and a breakdown by emoji group.

Prompt-following is judged from the generated pixels by the project's deterministic analyser
(``ldm.eval.shapes_analyzer``). FID and CLIP score use torchmetrics and need pretrained Inception/CLIP weights; offline
they are skipped with a message saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder or Hub id (required but with --clip_only)")
    p.add_argument("--suite", choices=["shapes", "emoji"], default="shapes")
    p.add_argument("--clip", default="models/emoji-clip", help="emoji suite: the project CLIP (CLIPModel folder)")
    p.add_argument("--data_dir", default="data/emoji", help="emoji suite: the imagefolder of ldm.data.emoji")
    p.add_argument("--sets", nargs="+", default=["train", "heldout", "natural"], help="emoji suite: prompt sets")
    p.add_argument("--clip_only", action="store_true",
                   help="emoji suite: only the CLIP's own retrieval on the real renders (no --model needed)")
    p.add_argument("--split", choices=["heldout", "validation", "train"], default="heldout")
    p.add_argument("--num_prompts", type=int, default=96)
    p.add_argument("--steps", type=int, default=None, help="default: 50, or the distilled step count")
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--scheduler", choices=["ddim", "ddpm", "dpm", "euler"], default=None,
                   help="swap the saved scheduler (from_config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_seeds", type=int, default=1,
                   help="emoji suite: run it with seeds seed .. seed + N - 1 (each draws its own prompts and noise) "
                        "and report their prompt-weighted mean under 'pooled': one seed's 96 prompts resolve top-5 "
                        "retrieval to about +-5 points, three to about +-3")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS, else the idle CPUs: cores minus those busy now)")
    p.add_argument("--fid", action="store_true",
                   help="also FID against real renders (pip install 'ldm-hf[eval]' and Inception weights)")
    p.add_argument("--clip_score", default=None,
                   help="CLIP model id/folder for CLIP score (pip install 'ldm-hf[eval]' and its weights)")
    p.add_argument("--output", default=None, help="write a PNG grid here and the JSON next to it")
    args = p.parse_args(argv)
    if args.model is None and not args.clip_only:
        p.error("--model is required (or --suite emoji --clip_only)")
    if args.num_seeds < 1:
        p.error(f"--num_seeds must be at least 1 (got {args.num_seeds})")
    return args


def prompts_for(split: str, n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Single-shape (caption, attributes) prompts of a shapes split."""
    from ldm.data.shapes import heldout_prompts, sample_attributes

    if split == "heldout":
        return heldout_prompts(n, seed)
    return [sample_attributes(i, split, seed, two_shape_fraction=0.0) for i in range(n)]


def optional_metric(name: str, compute) -> float | None:
    try:
        return float(compute())
    except ImportError as err:
        print(f"{name} skipped: it needs torchmetrics: pip install 'ldm-hf[eval]' ({err})", file=sys.stderr)
        return None
    except Exception as err:  # missing weights (offline): say so, never fail the evaluation
        print(f"{name} skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
        return None


def steps_of(args, pipe) -> int:
    """The sampling steps the evaluation used (``--steps``, else the pipeline's default)."""
    return args.steps or pipe.default_num_inference_steps


def save_grid(images: list, path: Path, cols: int = 8) -> None:
    from diffusers.utils import make_image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = -(-len(images) // cols)
    blank = images[0].copy()
    blank.paste((0, 0, 0), (0, 0, blank.width, blank.height))
    make_image_grid(images + [blank] * (rows * cols - len(images)), rows, cols).save(path)


def load_clip(path: str):
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(path, use_safetensors=True).float().eval()  # stored in fp16
    tokenizer = CLIPTokenizer.from_pretrained(Path(path) / "tokenizer" if (Path(path) / "tokenizer").is_dir() else path)
    return clip, tokenizer


def evaluate_clip_only(args) -> dict:
    """The CLIP's own retrieval on the real renders of the held-out (test) and validation splits."""
    from ldm.eval.emoji_suite import render_retrieval

    clip, tokenizer = load_clip(args.clip)
    report = {"clip": args.clip, **{split: render_retrieval(clip, tokenizer, args.data_dir, split)
                                    for split in ("test", "validation")}}
    if args.output:
        Path(args.output).with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def evaluate_emoji_suite(args, pipe) -> dict:
    """The emoji suite: one report per set, a grid per set next to ``--output``; with ``--num_seeds`` N > 1 the sets
    are the first seed's, ``other_seeds`` the rest and ``pooled`` the mean over all N."""
    from ldm.eval.emoji_suite import evaluate_emoji, pool_reports

    clip, tokenizer = load_clip(args.clip)
    runs = [evaluate_emoji(pipe, clip, tokenizer, args.data_dir, args.sets, args.num_prompts, args.steps,
                           args.guidance_scale, args.seed + k, args.batch_size) for k in range(args.num_seeds)]
    images = [run.pop("images") for run in runs][0]  # the grids show the first seed
    result = runs[0]
    report = {"model": args.model, "suite": "emoji", "clip": args.clip, "steps": steps_of(args, pipe),
              "guidance_scale": pipe.guidance_scale, **result}
    if args.num_seeds > 1:
        report |= {"seeds": [args.seed + k for k in range(args.num_seeds)], "pooled": pool_reports(runs),
                   "other_seeds": runs[1:]}
    if args.output:
        out = Path(args.output)
        for name, set_images in images.items():
            save_grid(set_images, out.with_name(f"{out.stem}-{name}.png"))
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    summary = {k: {m: v[m] for m in ("n", "top1", "top5", "clip_score_ratio", "frechet_clip_distance")}
               for k, v in result.items()}
    if "pooled" in report:
        summary = {"seed": args.seed, **summary, "pooled": report["pooled"]}
    print(json.dumps(summary, indent=2))
    return report


def main(args: argparse.Namespace) -> dict:
    import diffusers

    from ldm.cli import SCHEDULERS, set_threads
    from ldm.eval.prompt_following import evaluate_prompt_following
    from pipelines import LatentPipeline

    set_threads(args.threads)
    if args.clip_only:
        return evaluate_clip_only(args)
    pipe = LatentPipeline.from_pretrained(args.model)
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if args.suite == "emoji":
        return evaluate_emoji_suite(args, pipe)
    prompts = prompts_for(args.split, args.num_prompts)
    result = evaluate_prompt_following(pipe, prompts, args.steps, args.guidance_scale, args.seed, args.batch_size)
    report = {"model": args.model, "split": args.split, "steps": steps_of(args, pipe),
              "guidance_scale": pipe.guidance_scale, **result.accuracy,
              "seconds_per_image": round(result.seconds_per_image, 4)}

    def to_uint8(images):
        import numpy as np

        return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2)

    if args.fid:
        def fid():
            from torchmetrics.image.fid import FrechetInceptionDistance

            from ldm.data.shapes import render_attributes

            metric = FrechetInceptionDistance(feature=2048)
            size = result.images[0].width
            metric.update(to_uint8([render_attributes(a, size, jitter_seed=i) for i, (_, a) in enumerate(prompts)]),
                          real=True)
            metric.update(to_uint8(result.images), real=False)
            return metric.compute()

        report["fid"] = optional_metric("FID", fid)
    if args.clip_score:
        def clip():
            from torchmetrics.multimodal.clip_score import CLIPScore

            metric = CLIPScore(model_name_or_path=args.clip_score)
            return metric(to_uint8(result.images), [c for c, _ in prompts])

        report["clip_score"] = optional_metric("CLIP score", clip)
    if args.output:
        save_grid(result.images, Path(args.output))
        Path(args.output).with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("evaluate", main, parse_args)
