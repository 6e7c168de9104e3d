#!/usr/bin/env python
"""Reproduce the bundled shapes models from scratch with the project's own scripts (one command).

    python training/make_shapes_model.py --output_dir models --work_dir work/shapes

Stages (each skipped when its output already exists, so an interrupted run picks up where it stopped):

1. text encoder: a seeded ``CLIPTextModel`` on the project tokenizer, token embeddings drawn at std 1 so each word
   keeps its identity (frozen, never trained: on real data you would pass a pretrained CLIP such as
   ``openai/clip-vit-large-patch14`` instead);
2. ``train_vae.py``: an ``AutoencoderKL`` on the built-in shapes data;
3. ``train_t2i.py``: the teacher U-Net (v-prediction, zero-terminal-SNR, plain v-loss, cached latents, EMA; no
   flips, since captions name left and right);
4. ``distill.py``: guidance folding, then progressive distillation 64 -> 32 -> 16 -> 8 -> 4 steps;
5. copy the teacher (DDIM, trailing) and the 4-step student to ``--output_dir`` and evaluate both on the held-out
   prompts (``evaluate.py``), writing ``EVALUATION.json`` and sample grids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ldm.recipes import add_recipe_arguments, run, ship_pipeline



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="models")
    p.add_argument("--work_dir", default="work/shapes")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=20000, help="training images rendered")
    p.add_argument("--text_width", type=int, default=128)
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--text_token_std", type=float, default=1.0,
                   help="std of the random text encoder's token embeddings (CLIP init: 0.02, at which its random "
                        "layers entangle the colour and shape words and held-out combinations suffer)")
    p.add_argument("--vae_channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--vae_norm_groups", type=int, default=4,
                   help="GroupNorm groups; 16 channels in 16 groups normalise each channel alone and lose colour")
    p.add_argument("--vae_steps", type=int, default=2000)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--unet_channels", type=int, nargs="+", default=[64, 128])
    p.add_argument("--unet_attention", type=int, nargs="+", default=[0, 1])
    p.add_argument("--unet_layers", type=int, default=1, help="ResBlocks per level on the way down")
    p.add_argument("--teacher_steps", type=int, default=5000)
    p.add_argument("--teacher_batch_size", type=int, default=64)
    p.add_argument("--teacher_lr", type=float, default=4e-4)
    p.add_argument("--teacher_snr_gamma", type=float, default=None,
                   help="min-SNR-gamma weighting for the teacher; default: the plain v-loss (min-SNR weights the x0 "
                        "error by min(SNR, gamma), ~0 near the zero-SNR end where background and colour are decided)")
    p.add_argument("--teacher_continue_steps", type=int, default=0,
                   help="optional second teacher stage: fine-tune the first stage's EMA weights with a fresh cosine "
                        "schedule; 0 skips it")
    p.add_argument("--teacher_continue_lr", type=float, default=2e-4)
    p.add_argument("--guidance_steps", type=int, default=4000,
                   help="optimizer steps of the guidance-folding stage (500 left the folded student 15 points of "
                        "colour accuracy behind the teacher with classifier-free guidance, 2000 at 1e-4 8 points)")
    p.add_argument("--guidance_lr", type=float, default=2e-4, help="peak learning rate of the guidance fold")
    p.add_argument("--distill_steps", type=int, default=500, help="optimizer steps per halving round")
    p.add_argument("--distill_batch_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    add_recipe_arguments(p, "no")
    return p.parse_args(argv)


VALIDATION_PROMPTS = ("a red circle on a white background", "a blue square on a black background",
                      "a green triangle on a gray background", "a yellow circle on a blue background")


def make_text_encoder(args, work: Path) -> Path:
    """Stage 0: the seeded random text encoder (token embeddings at ``--text_token_std``) and the tokenizer."""
    text_dir = work / "text_encoder"
    if not (text_dir / "config.json").is_file():
        from ldm.tiny import tiny_text_encoder
        from ldm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        tiny_text_encoder(tokenizer, args.text_width, args.seed, args.text_layers, 4,
                          token_embedding_std=args.text_token_std).save_pretrained(text_dir)
        tokenizer.save_pretrained(text_dir)
    return text_dir


def make_vae(args, work: Path, common: list) -> Path:
    """Stage 1: the VAE (train_vae.py)."""
    vae_dir = work / "vae"
    if not (vae_dir / "config.json").is_file():
        run("train_vae.py", *common, "--output_dir", vae_dir, "--block_out_channels", *args.vae_channels,
            "--norm_num_groups", args.vae_norm_groups, "--max_train_steps", args.vae_steps,
            "--train_batch_size", args.vae_batch_size, "--random_flip")
    return vae_dir


def make_teacher(args, work: Path, common: list, vae_dir: Path, text_dir: Path) -> Path:
    """Stage 2: the U-Net teacher (train_t2i.py), optionally continued in a second stage."""
    from ldm.latents import vae_scale_factor

    teacher_dir = work / "teacher"
    # both teacher stages: v-prediction on a zero-terminal-SNR schedule, cached latents, EMA, cosine LR, resumable
    teacher_common = [
        *common, "--cache_latents", "--prediction_type", "v_prediction", "--rescale_betas_zero_snr",
        "--caption_dropout", "0.1", "--use_ema", "--ema_decay", "0.999", "--train_batch_size", args.teacher_batch_size,
        "--lr_scheduler", "cosine", "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest", "--validation_prompts", *VALIDATION_PROMPTS,
        "--validation_guidance_scale", args.guidance_scale,
    ]
    if not (teacher_dir / "model_index.json").is_file():
        config = work / "teacher_unet.json"
        config.write_text(json.dumps({
            "block_out_channels": args.unet_channels, "attention_levels": [bool(a) for a in args.unet_attention],
            "layers_per_block": args.unet_layers, "attention_head_dim": 32, "norm_num_groups": 16,
            "sample_size": args.resolution // vae_scale_factor(args.vae_channels),
        }))
        run("train_t2i.py", *teacher_common, "--vae", vae_dir, "--text_encoder", text_dir, "--denoiser", "unet",
            "--denoiser_config", config, "--output_dir", teacher_dir,
            *(["--snr_gamma", args.teacher_snr_gamma] if args.teacher_snr_gamma is not None else []),
            "--max_train_steps", args.teacher_steps, "--learning_rate", args.teacher_lr, "--lr_warmup_steps", "200",
            "--validation_steps", "2000")
    if args.teacher_continue_steps:
        first_dir, teacher_dir = teacher_dir, work / "teacher-continued"
        if not (teacher_dir / "model_index.json").is_file():
            run("train_t2i.py", *teacher_common, "--pretrained_model_name_or_path", first_dir,
                "--output_dir", teacher_dir, "--max_train_steps", args.teacher_continue_steps,
                "--learning_rate", args.teacher_continue_lr, "--lr_warmup_steps", "100", "--validation_steps", "1000")
    return teacher_dir


def make_student(args, work: Path, teacher_dir: Path) -> Path:
    """Stage 3: guidance fold + progressive distillation to 64 / 2**rounds steps (distill.py)."""
    distill_dir = work / "distilled"
    student_dir = distill_dir / f"round-{args.rounds}-{64 // 2 ** args.rounds}-steps"
    if not (student_dir / "model_index.json").is_file():
        run("distill.py", "--teacher", teacher_dir, "--teacher_steps", "64", "--rounds", args.rounds,
            "--guidance_distillation", "--default_guidance_scale", args.guidance_scale, "--guidance_scale_min", "1",
            "--guidance_scale_max", "8", "--dataset_name", "shapes", "--max_train_samples", args.num_samples,
            "--cache_latents", "--guidance_steps", args.guidance_steps,
            "--guidance_learning_rate", args.guidance_lr, "--steps_per_round", args.distill_steps,
            "--train_batch_size", args.distill_batch_size, "--learning_rate", "1e-4", "--use_ema",
            "--checkpointing_steps", "500", "--output_dir", distill_dir, "--seed", args.seed,
            "--mixed_precision", args.mixed_precision,
            "--validation_prompts", "a red circle on a white background", "a blue square on a black background")
    return student_dir


def ship(out: Path, teacher_dir: Path, student_dir: Path) -> None:
    """Copy both pipelines to ``out`` in fp16 storage (``ldm.recipes.ship_pipeline``)."""
    out.mkdir(parents=True, exist_ok=True)
    ship_pipeline(teacher_dir, out / "shapes-teacher", trailing_ddim=True)
    ship_pipeline(student_dir, out / "shapes-student", trailing_ddim=False)


def evaluate_shipped(args, out: Path, work: Path, timings: dict) -> None:
    """evaluate.py on both shipped models; the figures go to EVALUATION.json and the cards."""
    report = {"timings_minutes": {k: round(v, 1) for k, v in timings.items()}}
    for name, steps in (("shapes-teacher", 50), ("shapes-student", None)):
        cmd = ["evaluate.py", "--model", out / name, "--num_prompts", args.eval_prompts,
               "--guidance_scale", args.guidance_scale, "--output", work / f"eval-{name}.png"]
        if steps:
            cmd += ["--steps", steps]
        run(*cmd)
        report[name] = json.loads((work / f"eval-{name}.json").read_text())
    (out / "EVALUATION.json").write_text(json.dumps(report, indent=2))
    for name in ("shapes-teacher", "shapes-student"):
        append_evaluation(out / name / "README.md", report[name], args)
    print(json.dumps(report, indent=2))


def main(args: argparse.Namespace) -> None:
    work, out = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--dataset_name", "shapes", "--max_train_samples", args.num_samples, "--resolution", args.resolution,
              "--seed", args.seed, "--mixed_precision", args.mixed_precision, "--report_to", "tensorboard"]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    text_dir = make_text_encoder(args, work)
    vae_dir = make_vae(args, work, common)
    timings["vae_minutes"] = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    teacher_dir = make_teacher(args, work, common, vae_dir, text_dir)
    timings["teacher_minutes"] = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    student_dir = make_student(args, work, teacher_dir)
    timings["distill_minutes"] = (time.perf_counter() - start) / 60
    ship(out, teacher_dir, student_dir)
    evaluate_shipped(args, out, work, timings)


def append_evaluation(card: Path, result: dict, args: argparse.Namespace) -> None:
    """Add the held-out prompt-following figures and the command that reproduces the model to its card."""
    acc = result  # evaluate.py's report: the accuracies sit at the top level
    card.write_text(card.read_text().rstrip() + f"""

## Evaluation

Prompt following on {acc['n']} held-out prompts (colour/shape/background combinations never seen in training),
{result['steps']} steps, guidance {result['guidance_scale']}, colours and shapes recognised from the pixels by
`ldm.eval`:

| colour | shape | background | position | size |
|---|---|---|---|---|
| {100 * acc['color_accuracy']:.1f} % | {100 * acc['shape_accuracy']:.1f} % | {100 * acc['background_accuracy']:.1f} % \
| {100 * acc['position_accuracy']:.1f} % | {100 * acc['size_accuracy']:.1f} % |

Reproduce the bundled models from scratch (2-core CPU, no downloads): `python training/make_shapes_model.py
--output_dir {args.output_dir} --work_dir {args.work_dir}`.
""")


if __name__ == "__main__":
    main(parse_args())
