#!/usr/bin/env python
"""Where does sampling lose a concept? A picture of what the denoiser knows against what its sampler draws.

    python training/inspect_denoiser.py --model models/emoji --output inspect.png \\
        --image work/emoji/data/train/google-1f98a.png --prompt "fox" \\
        --image work/emoji/data/train/twitter-1f680.png --prompt "rocket"

One column per (image, prompt) pair; rows, top to bottom:

* the real image, and its VAE round trip (what the latent space keeps);
* ``known t``: the denoiser's clean estimate x0 from the image's latent noised to each ``--timesteps`` t (one
  conditional forward, no guidance): what the model knows of the concept at that noise level;
* ``sampled t``: x0 along a sampling run from pure noise (the saved scheduler, ``--steps``, ``--guidance_scale``),
  taken at the step nearest each t, and the final image: whether the trajectory keeps what the model knows;
* ``restarted t`` (``--restart_timesteps``): the whole sampling run restarted from the image's latent noised to
  the run's first timestep at or below each t, down to t = 0 (a level below every timestep runs no step: the VAE round
  trip; one at or above the first timestep is plain sampling from that noised latent).

The latent mean squared error of each ``known`` estimate is printed, and every row's PSNR against the real images
(also written next to the PNG as JSON). A model that knows a concept (sharp ``known`` rows at high t) but loses it
along the trajectory (``sampled`` rows drifting from the blurry mean into blobs) is under-trained at the noise levels
where the sample commits to a layout, not missing the concept; the ``restarted`` rows' PSNR, falling as t rises, says
at which noise levels the sampler loses the images' detail.

Instead of ``--image`` / ``--prompt`` pairs, ``--data_dir`` (an emoji imagefolder, ``python -m ldm.data.emoji``)
takes ``--num_renders`` training Noto base renders with their second caption ("a fox face"), for the PSNR averages::

    python training/inspect_denoiser.py --model models/emoji --data_dir work/emoji/data --num_renders 32 \\
        --timesteps --restart_timesteps 0 20 50 100 200 400 700 999 --guidance_scale 4 --output restart.png
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--image", action="append", default=[], help="a real image (repeat; one per --prompt)")
    p.add_argument("--prompt", action="append", default=[], help="its prompt (repeat)")
    p.add_argument("--data_dir", default=None, help="instead of --image / --prompt: an emoji imagefolder's renders")
    p.add_argument("--num_renders", type=int, default=32, help="--data_dir: how many (sampled with --seed)")
    p.add_argument("--timesteps", type=int, nargs="*", default=[100, 250, 400, 600, 800],
                   help="the known and sampled rows' t (none: no such rows)")
    p.add_argument("--restart_timesteps", type=int, nargs="*", default=[], help="the restarted rows' t")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's (50, or a student's own count)")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="inspect.png")
    args = p.parse_args(argv)
    if len(args.image) != len(args.prompt):
        p.error(f"give one --prompt per --image (got {len(args.image)} images and {len(args.prompt)} prompts)")
    if bool(args.image) == bool(args.data_dir):
        p.error("give either --image / --prompt pairs or --data_dir")
    return args


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1], alpha composited onto white (as the emoji data builder does)."""
    from ldm.data.emoji import on_white
    from ldm.data.image_caption import image_to_tensor

    out = []
    for path in paths:
        if not Path(path).is_file():
            raise OSError(f"--image {path} does not exist.")
        out.append(image_to_tensor(on_white(Path(path).read_bytes()), size))
    return torch.stack(out)


def load_renders(data_dir: str, n: int, seed: int, size: int, style: str = "Noto") -> tuple[torch.Tensor, list[str]]:
    """``n`` training base renders of ``style`` from an emoji imagefolder (sampled with ``seed``) as (n, 3, size,
    size) in [-1, 1], and each render's second caption ("a fox face": the label with its article)."""
    import random

    from ldm.eval.emoji_suite import load_rows

    rows = [r for r in load_rows(data_dir)["train"] if r.get("style") == style and not r.get("variant")]
    if not rows:
        raise ValueError(f"--data_dir {data_dir} has no {style} base renders in its train split: build it with "
                         "`python -m ldm.data.emoji`.")
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return load_images([r["path"] for r in rows], size), [r["text"][min(1, len(r["text"]) - 1)] for r in rows]


def psnr(images: torch.Tensor, real: torch.Tensor) -> float:
    """Mean PSNR (dB) of images (B, 3, H, W) in [-1, 1] against the real ones (a peak-to-peak range of 2)."""
    mse = ((images.float().clamp(-1, 1) - real.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())


def restart(pipe, latents: torch.Tensor, noise: torch.Tensor, prompts: list[str], t0: int, steps: int,
            guidance_scale: float | None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1]: the pipeline's sampling run from ``latents`` noised with ``noise`` to the
    first of its timesteps at or below ``t0`` (the VAE round trip when none is), down to t = 0."""
    from ldm.latents import decode

    sampler = copy.deepcopy(pipe.scheduler)
    sampler.set_timesteps(steps)
    timesteps = sampler.timesteps
    start = next((i for i, t in enumerate(timesteps) if int(t) <= t0), None)
    if start is None:
        return decode(pipe.vae, latents).float()

    def noised(i: int) -> torch.Tensor:
        return sampler.add_noise(latents, noise, timesteps[i:i + 1].expand(len(latents)))

    def swap_in(_pipe, i, _t, tensors):  # after the step at timesteps[i] the latents sit at timesteps[i + 1]
        return {"latents": noised(start).to(tensors["latents"].dtype)} if i + 1 == start else {}

    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
               latents=noised(0) if start == 0 else noise, callback_on_step_end=swap_in).images
    return out.float() * 2 - 1


def estimate_x0(pipe, x_t: torch.Tensor, t: torch.Tensor, embeds, mask) -> torch.Tensor:
    """The denoiser's clean latent estimate (B, C, h, w) from x_t at integer timesteps t (B,), conditional only
    (a guidance-distilled student at w = 1, its conditional branch)."""
    from ldm.losses import predicted_x0

    denoiser = pipe.denoiser
    extra = {"guidance": torch.ones(len(t))} if denoiser.config.get("guidance_embedding") else {}
    pred = denoiser(x_t.to(denoiser.dtype), t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                    return_dict=False, **extra)[0][:, :x_t.shape[1]].float()
    return predicted_x0(pipe.scheduler, pred, x_t, t, pipe.scheduler.config.prediction_type)


@torch.no_grad()
def inspect(pipe, images: torch.Tensor, prompts: list[str], timesteps: list[int], steps: int, seed: int,
            guidance_scale: float | None, restart_timesteps=()) -> dict[str, torch.Tensor]:
    """{row name: (B, 3, H, W) images in [-1, 1]} (module docstring); prints the ``known`` rows' latent MSE."""
    from ldm.latents import decode, encode_posterior, sample_posterior, to_denoiser_space

    vae, scheduler = pipe.vae, pipe.scheduler
    latents = to_denoiser_space(sample_posterior(encode_posterior(vae, images), "mean", None), vae)
    embeds, _, mask, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    rows = {"real": images, "vae round trip": decode(vae, latents).float()}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    for t in timesteps:
        t_batch = torch.full((len(prompts),), t, dtype=torch.long)
        x_t = scheduler.add_noise(latents, noise, t_batch)
        x0 = estimate_x0(pipe, x_t, t_batch, embeds, mask)
        print(f"t={t}: latent MSE of the known x0 {((x0 - latents) ** 2).mean().item():.4f}")
        rows[f"known {t}"] = decode(vae, x0).float()
    steps_taken = []

    def keep(_, i, t, tensors):  # (timestep, latent after the step taken at it)
        steps_taken.append((int(t), tensors["latents"].clone()))
        return {}

    final = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                 generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
                 callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images
    # the latent after the step at t_i sits at t_{i+1}: the noisy latents of the trajectory, by their timestep
    trajectory = {t: x for (t, _), (_, x) in zip(steps_taken[1:], steps_taken[:-1])}
    # from noise down: the trajectory's latent nearest each t, denoised in one conditional forward as above
    for t in sorted(timesteps, reverse=True):
        nearest = min(trajectory, key=lambda s: abs(s - t))
        t_batch = torch.full((len(prompts),), nearest, dtype=torch.long)
        rows[f"sampled {nearest}"] = decode(vae, estimate_x0(pipe, trajectory[nearest].float(), t_batch, embeds,
                                                             mask)).float()
    rows["sampled, final"] = final.float() * 2 - 1
    for t in restart_timesteps:
        rows[f"restarted {t}"] = restart(pipe, latents, noise, prompts, t, steps, guidance_scale)
    return rows


def save_rows(rows: dict[str, torch.Tensor], output: str) -> None:
    """The rows stacked into one PNG; the row names are printed in order."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r.clamp(-1, 1)), dim=2) for r in rows.values()], dim=1)
    pixels = ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(pixels).save(output)
    print(f"Wrote {output}; rows: " + ", ".join(rows))


def main(args: argparse.Namespace) -> dict:
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    images, prompts = (load_images(args.image, size), args.prompt) if args.image else \
        load_renders(args.data_dir, args.num_renders, args.seed, size)
    steps = args.steps or pipe.default_num_inference_steps
    rows = inspect(pipe, images, prompts, args.timesteps, steps, args.seed, args.guidance_scale,
                   args.restart_timesteps)
    report = {"model": args.model, "images": len(prompts), "steps": steps,
              "psnr_db": {name: round(psnr(row, images), 2) for name, row in rows.items() if name != "real"}}
    print("\n".join(f"{name}: PSNR {value:.2f} dB" for name, value in report["psnr_db"].items()))
    save_rows(rows, args.output)
    Path(args.output).with_suffix(".json").write_text(json.dumps(report, indent=2))
    return rows


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("inspect_denoiser", main, parse_args)
