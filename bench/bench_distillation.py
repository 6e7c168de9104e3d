#!/usr/bin/env python
"""Progressive distillation: sampling time and quality of each round's student against its teacher (issue #4).

    python bench/bench_distillation.py --teacher models/shapes-teacher --distilled work/shapes/distilled

For the teacher at its full steps (classifier-free guidance, two denoiser rows per step, on the same 64-step grid the
distillation started from) and every saved stage (``guided-64-steps``, ``round-<r>-<N>-steps``), in one process and
with the same prompts and seeds (image i starts from the noise of seed + i), it reports:

* seconds per image (median of ``--repeats`` timed passes) and the speed-up over the teacher;
* the latent MSE to the teacher's samples (same starting noise);
* colour / shape / background accuracy on the held-out shapes prompts (``ldm.eval``), in points.

The teacher sampled with only as many DDIM steps as the last student is added for reference: it shows what the
distillation buys. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="models/shapes-teacher")
    p.add_argument("--distilled", default="work/shapes/distilled", help="distill.py's output folder")
    p.add_argument("--teacher_steps", type=int, default=64)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--num_prompts", type=int, default=96)
    p.add_argument("--seed", type=int, default=0,
                   help="draws the held-out prompts (heldout_prompts(num_prompts, seed)); image i starts from the "
                        "noise of seed + i. Another seed gives an independent sample of prompts to check a gap on")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def stage_folders(root: Path) -> list[Path]:
    """Saved stages, in distillation order (the guidance fold first, then rounds by number)."""
    def order(path: Path):
        m = re.fullmatch(r"round-(\d+)-\d+-steps", path.name)
        return int(m.group(1)) if m else 0

    return sorted((p for p in root.iterdir() if (p / "model_index.json").is_file()), key=order)


def main(args) -> dict:
    from diffusers import DDIMScheduler

    from ldm import ProgressiveDistillationScheduler
    from ldm.data.shapes import heldout_prompts
    from ldm.eval.prompt_following import evaluate_prompt_following
    from pipelines import LatentPipeline

    torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.num_prompts, args.seed)

    def measure(name, pipe, steps, forwards):
        pipe.set_progress_bar_config(disable=True)
        runs = [evaluate_prompt_following(pipe, prompts, steps, args.guidance_scale, seed=args.seed,
                                          batch_size=args.batch_size)
                for _ in range(args.repeats)]
        print(f"{name}: {statistics.median(r.seconds_per_image for r in runs):.4f} s/image", file=sys.stderr)
        return dict(name=name, steps=steps, forwards_per_step=forwards,
                    seconds_per_image=statistics.median(r.seconds_per_image for r in runs),
                    result=runs[0])

    teacher = LatentPipeline.from_pretrained(args.teacher)
    grid = ProgressiveDistillationScheduler.from_config(teacher.scheduler.config,
                                                        num_distilled_steps=args.teacher_steps)
    rows = [measure(f"teacher, {args.teacher_steps} steps + CFG",
                    LatentPipeline(**{**teacher.components, "scheduler": grid}), args.teacher_steps, 2)]
    stages = stage_folders(Path(args.distilled))
    for folder in stages:
        pipe = LatentPipeline.from_pretrained(folder)
        n = pipe.scheduler.config.num_distilled_steps
        rows.append(measure(folder.name, pipe, n, 1 if pipe.guidance_distilled else 2))
    last = rows[-1]["steps"]
    ddim = DDIMScheduler.from_config(teacher.scheduler.config)
    rows.append(measure(f"teacher, {last} DDIM steps + CFG (reference)",
                        LatentPipeline(**{**teacher.components, "scheduler": ddim}), last, 2))

    ref_seconds, ref_latents = rows[0]["seconds_per_image"], rows[0]["result"].latents
    table = []
    for row in rows:
        res = row.pop("result")
        table.append({
            **row,
            "speedup": ref_seconds / row["seconds_per_image"],
            "latent_mse_to_teacher": float(((res.latents - ref_latents) ** 2).mean()),
            **{k: 100 * res.accuracy[f"{k}_accuracy"] for k in ("color", "shape", "background")},
        })

    print("| sampler | steps | forwards/step | s/image | speed-up | latent MSE to teacher | colour % | shape % | "
          "background % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['name']} | {r['steps']} | {r['forwards_per_step']} | {r['seconds_per_image']:.4f} | "
              f"{r['speedup']:.1f}x | {r['latent_mse_to_teacher']:.4f} | {r['color']:.1f} | {r['shape']:.1f} | "
              f"{r['background']:.1f} |")
    summary = {"prompts": args.num_prompts, "seed": args.seed, "guidance_scale": args.guidance_scale, "rows": table}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(parse_args())
