#!/usr/bin/env python
"""Reproduce the bundled emoji models from scratch with the project's own scripts (one command, resumable).

    python training/make_emoji_model.py --work_dir work/emoji --output_dir models
    python training/make_emoji_model.py --stages vae            # one stage (or several) at a time

Stages (each skipped when its output exists; the training stages resume from their last checkpoint, so an
interrupted command picks up where it stopped):

1. ``data``: ``python -m ldm.data.emoji``: Noto + Twemoji renders and emojibase captions from pinned npm tarballs;
2. ``clip``: ``train_clip.py``: a small CLIP on the training pairs (its text tower is the pipelines' text encoder, the
   whole CLIP scores the evaluation);
3. ``vae``: ``train_vae.py``: an ``AutoencoderKL`` with 16 x 16 x 4 latents of the 64 px renders;
4. ``teacher-unet``, ``teacher-dit``: ``train_t2i.py``: a U-Net and a DiT of about the same training FLOPs per image,
   the same steps, batch and recipe (v-prediction, zero-terminal SNR, cached latents, a caption drawn from each
   image's list every step, EMA, bf16 autocast);
5. ``evaluate-teachers``: ``evaluate.py --suite emoji`` on both; the better (held-out top-5) becomes the teacher;
6. ``student``: ``distill.py``: guidance folding, then 64 -> 32 -> 16 -> 8 -> 4 steps.

Shipping (fp16 copies in ``models/emoji``, ``models/emoji-student``, ``models/emoji-clip`` with cards and the
evaluation) is added once the teachers have trained; until then the stages above are the recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ldm.recipes import add_recipe_arguments, run

STAGES = ("data", "clip", "vae", "teacher-unet", "teacher-dit", "evaluate-teachers", "student")
VALIDATION_PROMPTS = ("a red fox", "a slice of pizza", "a red apple", "a rocket")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="work/emoji")
    p.add_argument("--output_dir", default="models")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--npm_cache", default=None, help="where the npm tarballs are kept (default: ~/.cache/ldm/npm)")
    p.add_argument("--clip_steps", type=int, default=2500)
    p.add_argument("--vae_steps", type=int, default=2500)
    p.add_argument("--vae_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--teacher_batch_size", type=int, default=64)
    p.add_argument("--teacher_lr", type=float, default=3e-4)
    p.add_argument("--unet_channels", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--dit_size", nargs=3, type=int, default=[256, 10, 4], metavar=("WIDTH", "DEPTH", "HEADS"),
                   help="DiT width, depth, heads (patch 2); the default matches the U-Net's FLOPs per image")
    p.add_argument("--guidance_steps", type=int, default=3000)
    p.add_argument("--distill_steps", type=int, default=1000)
    add_recipe_arguments(p, "bf16")
    return p.parse_args(argv)


def stage_data(args, work: Path) -> None:
    if not (work / "data" / "train" / "metadata.jsonl").is_file():
        run("ldm.data.emoji", "--out", work / "data", *(["--cache_dir", args.npm_cache] if args.npm_cache else []))


def stage_clip(args, work: Path) -> None:
    if not (work / "clip" / "text_encoder" / "config.json").is_file():
        run("train_clip.py", "--train_data_dir", work / "data", "--output_dir", work / "clip", "--max_train_steps",
            args.clip_steps, "--train_batch_size", 128, "--checkpointing_steps", 250, "--resume_from_checkpoint",
            "latest", "--mixed_precision", args.mixed_precision, "--seed", args.seed)


def stage_vae(args, work: Path) -> None:
    if not (work / "vae" / "config.json").is_file():
        run("train_vae.py", "--train_data_dir", work / "data", "--output_dir", work / "vae", "--resolution", 64,
            "--block_out_channels", *args.vae_channels, "--norm_num_groups", 8, "--train_batch_size", 24,
            "--max_train_steps", args.vae_steps, "--learning_rate", "1e-3", "--lr_warmup_steps", 100, "--random_flip",
            "--checkpointing_steps", 250, "--resume_from_checkpoint", "latest", "--mixed_precision",
            args.mixed_precision, "--seed", args.seed)


def denoiser_config(args, work: Path, kind: str) -> Path:
    config = {"unet": {"block_out_channels": args.unet_channels, "attention_levels": [False, True, True],
                       "layers_per_block": 2, "attention_head_dim": 32, "norm_num_groups": 32},
              "dit": {"patch_size": 2, "hidden_size": args.dit_size[0], "depth": args.dit_size[1],
                      "num_attention_heads": args.dit_size[2]}}[kind]
    path = work / f"teacher_{kind}.json"
    path.write_text(json.dumps(config))
    return path


def stage_teacher(args, work: Path, kind: str) -> None:
    out = work / f"teacher-{kind}"
    if (out / "model_index.json").is_file():
        return
    run("train_t2i.py", "--vae", work / "vae", "--text_encoder", work / "clip" / "text_encoder", "--tokenizer",
        work / "clip" / "tokenizer", "--denoiser", kind, "--denoiser_config", denoiser_config(args, work, kind),
        "--train_data_dir", work / "data", "--resolution", 64, "--cache_latents", "--prediction_type",
        "v_prediction", "--rescale_betas_zero_snr", "--caption_dropout", "0.1", "--use_ema", "--ema_decay", "0.9995",
        "--train_batch_size", args.teacher_batch_size, "--learning_rate", args.teacher_lr, "--lr_scheduler", "cosine",
        "--lr_warmup_steps", 500, "--max_train_steps", args.teacher_steps, "--checkpointing_steps", 250,
        "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "latest", "--mixed_precision",
        args.mixed_precision, "--validation_prompts", *VALIDATION_PROMPTS, "--validation_steps", 2500,
        "--validation_guidance_scale", args.guidance_scale, "--output_dir", out, "--seed", args.seed)


def stage_evaluate_teachers(args, work: Path) -> str:
    """Both teachers on the emoji suite; returns the kind with the better held-out top-5 retrieval."""
    scores = {}
    for kind in ("unet", "dit"):
        report = work / f"eval-teacher-{kind}.json"
        if not report.is_file():
            run("evaluate.py", "--suite", "emoji", "--model", work / f"teacher-{kind}", "--clip", work / "clip",
                "--data_dir", work / "data", "--num_prompts", args.eval_prompts, "--steps", 50, "--guidance_scale",
                args.guidance_scale, "--output", report.with_suffix(".png"))
        scores[kind] = json.loads(report.read_text())["heldout"]["top5"]
    best = max(scores, key=scores.get)
    (work / "teacher-choice.json").write_text(json.dumps({"heldout_top5": scores, "chosen": best}, indent=2))
    return best


def stage_student(args, work: Path, kind: str) -> Path:
    out = work / "distilled"
    student = out / "round-4-4-steps"
    if not (student / "model_index.json").is_file():
        run("distill.py", "--teacher", work / f"teacher-{kind}", "--teacher_steps", 64, "--rounds", 4,
            "--guidance_distillation", "--default_guidance_scale", args.guidance_scale, "--guidance_scale_min", 1,
            "--guidance_scale_max", 8, "--train_data_dir", work / "data", "--cache_latents", "--guidance_steps",
            args.guidance_steps, "--guidance_learning_rate", "2e-4", "--steps_per_round", args.distill_steps,
            "--train_batch_size", 32, "--learning_rate", "1e-4", "--use_ema", "--checkpointing_steps", 250,
            "--output_dir", out, "--seed", args.seed, "--mixed_precision", args.mixed_precision,
            "--validation_prompts", *VALIDATION_PROMPTS)
    return student


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    kind = None
    for stage in args.stages:
        start = time.perf_counter()
        if stage == "data":
            stage_data(args, work)
        elif stage == "clip":
            stage_clip(args, work)
        elif stage == "vae":
            stage_vae(args, work)
        elif stage.startswith("teacher-"):
            stage_teacher(args, work, stage.split("-")[1])
        elif stage == "evaluate-teachers":
            kind = stage_evaluate_teachers(args, work)
        elif stage == "student":
            stage_student(args, work, kind or json.loads((work / "teacher-choice.json").read_text())["chosen"])
        timings[stage] = round(timings.get(stage, 0) + (time.perf_counter() - start) / 60, 1)
        timings_file.write_text(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main(parse_args())
