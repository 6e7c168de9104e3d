#!/usr/bin/env python
"""How much each training design choice buys, at a fixed compute budget on the shapes data (issue 18).

    OMP_NUM_THREADS=1 python bench/bench_convergence.py --seeds 0 1 --out work/convergence   # ~2 h a seed

Every variant trains the same small denoiser (``train_t2i.py``, in segments resumed from the last checkpoint, so a
run is exactly one uninterrupted run) on the built-in shapes data with the bundled shapes model's frozen VAE and text
encoder, the same batch, learning rate (constant after warm-up), steps and seeds. After each segment it records:

* the deterministic validation loss (``--validation_loss_every``; comparable between seeds and weightings of one
  objective, not across eps / v / flow, whose targets differ);
* prompt following on held-out prompts (``ldm.eval``'s strict analyser, DDIM or the flow scheduler, 25 steps,
  guidance 4): the measure that compares across objectives;
* the training wall time.

Variants: eps / v (zero-terminal SNR) / flow; uniform vs logit-normal noise levels (v and flow); min-SNR-5 on/off
(eps); U-Net vs DiT at matched training FLOPs (v); fp32 vs bf16 mixed precision (v). The table gives, per variant,
the mean and spread over seeds of the final figures, the first step (and wall time) at which the colour accuracy
reached ``--target_accuracy``, and the first at which the validation loss reached its objective group's; a
difference smaller than the spread between seeds is noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
UNET = {"_class_name": "UNetModel", "block_out_channels": [32, 64], "attention_levels": [False, True],
        "layers_per_block": 1, "attention_head_dim": 32, "norm_num_groups": 8}
# 0.540 GFLOP per training image against the U-Net's 0.529 (the first run's 96 wide, depth 4 had 0.288)
DIT = {"_class_name": "DiTModel", "patch_size": 2, "hidden_size": 120, "depth": 5, "num_attention_heads": 4}
V = ["--prediction_type", "v_prediction", "--rescale_betas_zero_snr"]
VARIANTS = {
    "eps": ("unet", ["--prediction_type", "epsilon"]),
    "eps + min-SNR 5": ("unet", ["--prediction_type", "epsilon", "--snr_gamma", "5"]),
    "v": ("unet", V),
    "v + logit-normal t": ("unet", V + ["--weighting_scheme", "logit_normal"]),
    "flow, uniform s": ("unet", ["--prediction_type", "flow", "--weighting_scheme", "uniform"]),
    "flow + logit-normal s": ("unet", ["--prediction_type", "flow", "--weighting_scheme", "logit_normal"]),
    "v, DiT (matched FLOPs)": ("dit", V),
    "v, fp32 (others bf16)": ("unet", V + ["--mixed_precision", "no"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="work/convergence")
    p.add_argument("--base", default="models/shapes-teacher", help="the pipeline whose VAE and text encoder are used")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--segments", nargs="+", type=int, default=[500, 1000, 1500, 2000],
                   help="the optimizer steps after which each run is evaluated (the last is the budget)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_samples", type=int, default=4000, help="training images of the shapes set")
    p.add_argument("--num_prompts", type=int, default=48, help="held-out prompts per evaluation")
    p.add_argument("--target_metric", default="color_accuracy", choices=["color_accuracy", "shape_accuracy"],
                   help="the accuracy whose first step at --target_accuracy is reported (at this budget shapes stay "
                        "below 50 %%, so colour is the default)")
    p.add_argument("--target_accuracy", type=float, default=0.5)
    p.add_argument("--smoke", action="store_true", help="2 variants, 1 seed, 2 tiny segments: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.variants, args.seeds, args.segments, args.num_samples, args.num_prompts = \
            ["v", "flow + logit-normal s"], [0], [4, 8], 64, 4
    return args


def train_segment(args, name: str, kind: str, flags: list[str], seed: int, steps: int) -> float:
    """``train_t2i.py`` up to ``steps`` (resuming the run's last checkpoint); returns its wall seconds."""
    out = Path(args.out) / slug(name) / f"seed-{seed}"
    config = Path(args.out) / f"{kind}.json"  # written once by main()
    cmd = [sys.executable, str(ROOT / "training" / "train_t2i.py"), "--pretrained_model_name_or_path", args.base,
           "--denoiser", kind, "--denoiser_config", str(config), "--dataset_name", "shapes", "--max_train_samples",
           str(args.num_samples), "--resolution", "64", "--cache_latents", "--latents_cache_dir",
           str(Path(args.out) / "cache"), "--train_batch_size", str(args.batch_size), "--learning_rate", "3e-4",
           "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(min(100, args.segments[0])),
           "--max_train_steps", str(steps), "--checkpointing_steps", str(args.segments[0]), "--checkpoints_total_limit",
           "1", "--resume_from_checkpoint", "latest", "--validation_loss_every", str(args.segments[0]),
           "--validation_loss_samples", "64", "--mixed_precision", "bf16", "--report_to", "none", "--seed", str(seed),
           "--output_dir", str(out), *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def segment_seconds(args, name: str, kind: str, flags: list[str], seed: int, steps: int) -> float:
    """The segment's training wall seconds, written to ``segment_seconds.json`` as soon as it is trained: a bench
    killed before the segment's evaluation was recorded resumes with that time instead of timing a resume that
    trains nothing."""
    record = Path(args.out) / slug(name) / f"seed-{seed}" / "segment_seconds.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if str(steps) not in done:
        done[str(steps)] = round(train_segment(args, name, kind, flags, seed, steps), 1)
        record.write_text(json.dumps(done))
    return done[str(steps)]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def evaluate(args, folder: Path) -> dict:
    """Prompt following of the saved pipeline on held-out prompts (strict analyser), and its last validation loss."""
    import torch

    from ldm.data.shapes import heldout_prompts
    from ldm.eval.prompt_following import evaluate_prompt_following
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        result = evaluate_prompt_following(pipe, heldout_prompts(args.num_prompts), 25, 4.0)
    lines = (folder / "logs" / "validation_loss.jsonl").read_text().splitlines()
    return {**{k: v for k, v in result.accuracy.items() if k != "n"}, "val_loss": json.loads(lines[-1])["val_loss"]}


def run_variant(args, name: str, seed: int) -> list[dict]:
    """Every segment of one run; segments already recorded in its ``results.jsonl`` (an interrupted bench) are
    kept, with their wall times, and not trained again."""
    kind, flags = VARIANTS[name]
    folder = Path(args.out) / slug(name) / f"seed-{seed}"
    record = folder / "results.jsonl"
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    for steps in args.segments:
        if any(r["step"] == steps for r in rows):
            continue
        seconds = (rows[-1]["seconds"] if rows else 0.0) + segment_seconds(args, name, kind, flags, seed, steps)
        rows.append({"step": steps, "seconds": round(seconds, 1), **evaluate(args, folder)})
        with record.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(json.dumps({"variant": name, "seed": seed, **rows[-1]}), flush=True)
    return rows


def objective(name: str) -> str:
    """The prediction target a variant trains (validation losses compare only within one)."""
    flags = VARIANTS[name][1]
    return flags[flags.index("--prediction_type") + 1]


def first_reached(rows: list[dict], ok) -> str:
    """'step (seconds)' of the first recorded segment where ``ok(row)`` holds, or '-'."""
    row = next((r for r in rows if ok(r)), None)
    return f"{row['step']} ({row['seconds']:.0f} s)" if row else "-"


def summary(args, runs: dict) -> str:
    """The markdown table: final figures (mean ± half-range over seeds) and the first step (and wall time) at
    which each run reached the target accuracy and its objective group's loss (the worst final validation loss
    among the variants of the same prediction target); a row per variant, its per-seed steps comma-separated."""
    def spread(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"

    metric = args.target_metric
    label = {"color_accuracy": "colour", "shape_accuracy": "shape"}[metric]
    goal = {}
    for name, by_seed in runs.items():
        worst = max(rows[-1]["val_loss"] for rows in by_seed.values())
        goal[objective(name)] = max(goal.get(objective(name), 0.0), worst)
    head = (f"| variant | val loss (own objective) | colour % | shape % | position % | first step with {label} >= "
            f"{100 * args.target_accuracy:.0f} % (per seed) | first step at the group's loss (per seed) | train s |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, by_seed in runs.items():
        final = [rows[-1] for rows in by_seed.values()]
        accuracy = [first_reached(rows, lambda r: r[metric] >= args.target_accuracy) for rows in by_seed.values()]
        loss = [first_reached(rows, lambda r: r["val_loss"] <= goal[objective(name)]) for rows in by_seed.values()]
        lines.append(f"| {name} | {statistics.mean(r['val_loss'] for r in final):.4f} | "
                     f"{spread([r['color_accuracy'] for r in final])} | "
                     f"{spread([r['shape_accuracy'] for r in final])} | "
                     f"{spread([r['position_accuracy'] for r in final])} | {', '.join(accuracy)} | {', '.join(loss)} | "
                     f"{statistics.mean(r['seconds'] for r in final):.0f} |")
    return head + "\n".join(lines)


def main(args) -> str:
    from ldm import DiTModel, UNetModel
    from ldm.flops import denoiser_training_flops

    Path(args.out).mkdir(parents=True, exist_ok=True)
    for kind, cls, config in (("unet", UNetModel, UNET), ("dit", DiTModel, DIT)):
        model = cls(**{k: v for k, v in config.items() if k != "_class_name"}, sample_size=16, cross_attention_dim=64)
        (Path(args.out) / f"{kind}.json").write_text(json.dumps(config))
        print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{denoiser_training_flops(model) / 1e9:.3f} GFLOP per training image", file=sys.stderr)
    runs = {name: {seed: run_variant(args, name, seed) for seed in args.seeds} for name in args.variants}
    table = summary(args, runs)
    (Path(args.out) / "convergence.json").write_text(json.dumps(runs, indent=1))
    print(table)
    return table


if __name__ == "__main__":
    main(parse_args())
