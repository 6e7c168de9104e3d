"""Training throughput with and without the latent cache, and ldm's training step against diffusers', interleaved.

    python bench/bench_training.py                   # full run
    python bench/bench_training.py --quick           # fewer images and rounds
    python bench/bench_training.py --only caching    # or: step

1. caching: images/s of train_t2i's own training step at 256 px, batch 4, fp32, on a real ``imagefolder`` of 256-px
   PNGs with captions (written to a temporary folder), loaded by ``make_train_dataloader`` and prepared by accelerate
   as the script does, once encoding on the fly (PNG decode + crop, VAE encode, text encoder, every step) and once
   from the latent cache (``cache_latents_and_text``), interleaved, the same denoiser and optimizer. The step is the
   library's own ``ldm.training_step.diffusion_step`` (caption dropout 0.1, epsilon, posterior sample) + backward +
   gradient clipping + AdamW, as ``ldm.train_loop`` runs it. Main setting: the Stable Diffusion 1.x VAE architecture
   (channels 128/256/512/512, 83.7M parameters) and a CLIP text encoder of SD-1.x's shape (768 wide, 12 layers),
   both seeded random (same FLOPs as the real ones); also the bench-diffusers VAE (64/128/128/128, 6.9M) with the
   same text encoder. Denoiser: ldm UNetModel with the layout of bench-diffusers' UNet (128/256/384, attention at
   the first two levels, head_dim 32), cross-attention 768. Also reported: the one-off cost of building the cache
   and after how many epochs it pays off.
2. step: one training step (fp32, AdamW, epsilon MSE, batch 4, 32x32 latents, 77 CLIP tokens of width 256, the text
   embeddings computed once: bench-diffusers' "train" section) of
     diffusers UNet2DConditionModel  vs ldm UNetModel   (matched FLOPs)
     diffusers PixArtTransformer2DModel vs ldm DiTModel
   FLOPs per step (forward + backward) come from FlopCounterMode plus formulas for the CPU flash-attention kernels,
   forward and backward (it counts neither).

Prints a table, then one JSON line. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

from common import (  # bench/common.py: also sets the HF offline switches and puts the repo root on sys.path
    LATENT, PROMPT, T0, build_diffusers_unet, build_ldm_dit, build_ldm_unet, build_pixart, build_scheduler,
    bench_parser, build_text_encoder, build_vae, count_flops, env_record, footer_lines, interleaved, log, med, n_params,
    parse_only, quiet,
)

import torch  # noqa: E402

BATCH, PIXELS = 4, 256
SD_VAE_CHANNELS, SMALL_VAE_CHANNELS = (128, 256, 512, 512), (64, 128, 128, 128)
CLIP_L = dict(width=768, layers=12, heads=12)  # SD-1.x's text encoder shape (openai/clip-vit-large-patch14)


# ------------------------------------------------------------------------------------------------ data
def write_imagefolder(folder: Path, n: int, pixels: int, seed: int = 0) -> Path:
    """n RGB PNGs of pixels x pixels with captions (metadata.jsonl): an ``imagefolder`` as users give it.

    The images are smooth random colour fields with shapes and mild grain, so they compress like photos rather than
    like flat shapes or pure noise (~100-200 KB each at 256 px).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from ldm.tokenizer import caption_corpus

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = caption_corpus(n, seed=seed)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            field = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
            image = Image.fromarray(field).resize((pixels, pixels), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y = (int(v) for v in rng.integers(0, pixels, 2))
                r = int(rng.integers(pixels // 16, pixels // 3))
                draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            array = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (pixels, pixels, 3)).astype(np.int16)
            Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption}) + "\n")
    return folder


def cycle(loader):
    """Endless batches from an accelerate-prepared loader, one epoch after another (as the training loop does)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------------------------ 1. caching
class TimedEncoder:
    """A ``BatchEncoder`` that records how long each call takes (the "encode" part of a step)."""

    def __init__(self, encoder):
        self.encoder, self.seconds = encoder, 0.0
        self.empty_embeds, self.empty_mask = encoder.empty_embeds, encoder.empty_mask

    def __call__(self, batch, generator):
        t = time.perf_counter()
        out = self.encoder(batch, generator)
        self.seconds = time.perf_counter() - t
        return out


class TrainStep:
    """The library's training step (``ldm.training_step.diffusion_step`` + backward + clip + AdamW, as
    ``ldm.train_loop`` runs it) on the batches of one loader.

    Each call takes the next batch and records (data, encode, train) seconds: fetching and collating the batch, the
    ``BatchEncoder`` (VAE + text encoder for raw batches; slicing, casts and the posterior sample for cached ones),
    and the rest (noise, denoiser forward and backward, loss, clipping, optimizer).
    """

    def __init__(self, ctx: dict, loader, encoder):
        self.ctx, self.batches, self.encoder, self.parts, self.n = ctx, cycle(loader), TimedEncoder(encoder), [], 0

    def __call__(self) -> None:
        from ldm.train_loop import step_generator
        from ldm.training_step import diffusion_step

        c = self.ctx
        acc, denoiser, optimizer = c["accelerator"], c["denoiser"], c["optimizer"]
        t0 = time.perf_counter()
        batch = next(self.batches)
        t1 = time.perf_counter()
        generator = step_generator(0, self.n, acc.process_index)
        self.n += 1
        with acc.accumulate(denoiser):
            loss = diffusion_step(denoiser, self.encoder, c["objective"], batch, generator).loss
            acc.backward(loss)  # --- run_training's update
            if acc.sync_gradients:
                acc.clip_grad_norm_(c["params"], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        self.parts.append((t1 - t0, self.encoder.seconds, t2 - t1 - self.encoder.seconds))


def caching_setup(args, tok, tmp: Path) -> tuple:
    """The imagefolder, the accelerator, the text encoder, both VAEs and the prepared denoiser + optimizer."""
    from ldm.data.image_caption import DataArgs, prepare_training_dataset
    from ldm.distributed import make_accelerator
    from ldm.noise_schedules import training_scheduler
    from ldm.train_loop import make_optimizer
    from ldm.training_step import Objective

    log(f"caching: writing {args.images} PNGs of {PIXELS} px")
    data_dir = write_imagefolder(tmp / "images", args.images, PIXELS)
    png_kb = sum(p.stat().st_size for p in data_dir.glob("*.png")) / args.images / 1024
    accelerator = make_accelerator(tmp / "run", report_to="none", seed=0)
    logging_quiet()
    data_args = DataArgs(train_data_dir=str(data_dir), resolution=PIXELS, cache_dir=str(tmp / "hf-cache"), seed=0)
    dataset, collator, _ = prepare_training_dataset(data_args)  # checks the rows once (cached by datasets)
    text_encoder = build_text_encoder(tok, **CLIP_L).requires_grad_(False)
    vaes = {"sd": build_vae(block_out_channels=SD_VAE_CHANNELS).requires_grad_(False),
            "small": build_vae(block_out_channels=SMALL_VAE_CHANNELS).requires_grad_(False)}
    denoiser = build_ldm_unet(32, cross_attention_dim=CLIP_L["width"]).train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, 1e-4)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    ctx = {"accelerator": accelerator, "denoiser": denoiser, "optimizer": optimizer, "params": params,
           "objective": Objective(training_scheduler(), "epsilon", caption_dropout=0.1)}
    out = {"pixels": PIXELS, "batch": BATCH, "images": args.images, "png_kb_per_image": round(png_kb, 1),
           "random_flip": args.random_flip, "denoiser": {
               "class": "UNetModel", "params_M": round(n_params(denoiser) / 1e6, 2),
               "config": {k: denoiser.config[k] for k in ("block_out_channels", "attention_levels",
                                                          "layers_per_block", "attention_head_dim",
                                                          "cross_attention_dim")}},
           "text_encoder": {"width": CLIP_L["width"], "layers": CLIP_L["layers"],
                            "params_M": round(n_params(text_encoder) / 1e6, 2)},
           "settings": {}}
    return out, ctx, data_args, dataset, collator, text_encoder, vaes


def caching_steps(args, tok, tmp: Path, out, ctx, data_args, dataset, collator, text_encoder, vaes) -> dict:
    """Build each VAE's latent cache (timed) and a TrainStep per (VAE, cached or not)."""
    from ldm.data.latent_cache import cache_latents_and_text
    from ldm.data.loader import make_train_dataloader
    from ldm.training_step import BatchEncoder

    accelerator, steps = ctx["accelerator"], {}
    for name, vae in vaes.items():
        setting = out["settings"][name] = {"vae_channels": list(vae.config.block_out_channels),
                                           "vae_params_M": round(n_params(vae) / 1e6, 2)}
        log(f"caching: building the {name} VAE's latent cache ({args.images} images)")
        t = time.perf_counter()
        cache_latents_and_text(dataset, collator, vae, text_encoder, tok, str(tmp / f"cache-{name}"),
                               args.random_flip)
        setting["cache_build_s"] = round(time.perf_counter() - t, 2)
        setting["cache_build_s_per_image"] = round(setting["cache_build_s"] / args.images, 4)
        encoder = BatchEncoder(vae, text_encoder, tok, args.random_flip, "posterior")
        for cached in (True, False):
            # the training script's own data path; the cached one reuses the cache file built above
            loader, _ = make_train_dataloader(accelerator, data_args, vae, text_encoder, tok, BATCH,
                                              cache_latents=cached, cache_dir=str(tmp / f"cache-{name}"),
                                              random_flip=args.random_flip)
            steps[(name, cached)] = TrainStep(ctx, accelerator.prepare(loader), encoder)
        setting["flops"] = step_flops(vae, text_encoder, tok, ctx["denoiser"])
    return steps


def caching_summary(setting: dict, times: dict, steps: dict, name: str) -> None:
    """Medians, speed-ups and the cache's pay-off for one VAE setting (in place)."""
    for cached in (True, False):
        ts, parts = times[(name, cached)], steps[(name, cached)].parts
        setting["cached" if cached else "on_the_fly"] = {
            "median_s": round(med(ts), 3), "min_s": round(min(ts), 3), "runs_s": [round(v, 3) for v in ts],
            "images_per_s": round(BATCH / med(ts), 3),
            "data_ms": round(med([p[0] for p in parts]) * 1e3, 1),
            "encode_ms": round(med([p[1] for p in parts]) * 1e3, 1),
            "train_ms": round(med([p[2] for p in parts]) * 1e3, 1),
        }
    on, ca = setting["on_the_fly"], setting["cached"]
    setting["speedup"] = round(on["median_s"] / ca["median_s"], 3)
    setting["speedup_min"] = round(on["min_s"] / ca["min_s"], 3)
    setting["speedup_paired"] = round(med([a / b for a, b in zip(times[(name, False)], times[(name, True)])]), 3)
    # building the cache costs B s/image once; each epoch then saves (on - cached) s/image
    saved = (on["median_s"] - ca["median_s"]) / BATCH
    setting["payoff_epochs"] = round(setting["cache_build_s_per_image"] / saved, 2) if saved > 0 else None
    fl = setting["flops"]
    setting["flop_ratio"] = round((fl["vae_encode_gflop"] + fl["text_encoder_gflop"] + fl["train_step_gflop"])
                                  / fl["train_step_gflop"], 3)


def run_caching(args, tok, tmp: Path) -> dict:
    """Section 1; see the module docstring."""
    out, ctx, data_args, dataset, collator, text_encoder, vaes = caching_setup(args, tok, tmp)
    steps = caching_steps(args, tok, tmp, out, ctx, data_args, dataset, collator, text_encoder, vaes)
    order = [(name, cached) for name in vaes for cached in (True, False)]
    rounds = args.caching_rounds
    log(f"caching: one warm-up step (optimizer state), then {rounds} interleaved rounds of {len(order)} training "
        "steps")
    steps[order[0]]()
    steps[order[0]].parts.clear()
    times = interleaved({k: steps[k] for k in order}, warmup=0, reps=rounds, no_grad=False,
                        after_round=lambda r: log(f"caching round {r + 1}/{rounds} done"))
    for name in vaes:
        caching_summary(out["settings"][name], times, steps, name)
    return out


def step_flops(vae, text_encoder, tok, denoiser) -> dict:
    """GFLOP per batch of the VAE encode, the text encoder (77 tokens) and the denoiser's training step (forward +
    backward at 77 text tokens). Counted on one image and multiplied by the batch (each count is linear in it)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, PIXELS, PIXELS, generator=g) * 2 - 1
    ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    x = torch.randn(1, 4, PIXELS // 8, PIXELS // 8, generator=g)
    t = torch.tensor([500])

    def fwd_bwd():
        emb = torch.randn(1, tok.model_max_length, text_encoder.config.hidden_size, generator=g)
        mask = torch.ones(1, tok.model_max_length)
        denoiser(x, t, emb, encoder_attention_mask=mask).sample.square().mean().backward()

    vae_f = count_flops(lambda: vae.encode(pixels).latent_dist.parameters)
    te_f = count_flops(lambda: text_encoder(ids))
    train_f = count_flops(fwd_bwd, no_grad=False)
    denoiser.zero_grad(set_to_none=True)
    return {"vae_encode_gflop": round(BATCH * vae_f / 1e9, 2), "text_encoder_gflop": round(BATCH * te_f / 1e9, 2),
            "train_step_gflop": round(BATCH * train_f / 1e9, 2)}


def logging_quiet() -> None:
    """make_accelerator turns INFO logging on for the training scripts; the bench only wants warnings."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------ 2. step
def text_inputs(tok, text_encoder, batch: int):
    """bench-diffusers' train input: ``batch`` copies of the prompt -> embeddings (B, 77, 256), mask (B, 77)."""
    enc = tok([PROMPT] * batch, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    with torch.no_grad():
        emb = text_encoder(enc.input_ids)[0]
    return emb, enc.attention_mask


def step_models(args, tok) -> tuple[dict, dict, torch.Tensor]:
    """The denoisers of section 2 and, per row, (model, forward(noisy, t) -> (B, 4, h, w), pair, text mask)."""
    emb, mask = text_inputs(tok, build_text_encoder(tok), BATCH)
    ones = torch.ones_like(mask)
    no_res = {"resolution": None, "aspect_ratio": None}
    models = {"diffusers_unet": build_diffusers_unet(), "ldm_unet": build_ldm_unet(32)}
    if not args.no_dit:
        models.update(pixart=build_pixart(), ldm_dit=build_ldm_dit())
    calls = {
        "diffusers_unet": ("diffusers_unet", lambda m, x, t: m(x, t, encoder_hidden_states=emb, return_dict=False)[0],
                           "unet", "none (as diffusers' train_text_to_image)"),
        "ldm_unet": ("ldm_unet", lambda m, x, t: m(x, t, emb, mask, return_dict=False)[0], "unet",
                     "tokenizer mask (as train_t2i)"),
        "ldm_unet_77": ("ldm_unet", lambda m, x, t: m(x, t, emb, ones, return_dict=False)[0], "unet",
                        "all ones (77 tokens, nothing dropped)"),
    }
    if not args.no_dit:
        calls.update({
            "pixart": ("pixart", lambda m, x, t: m(x, encoder_hidden_states=emb, encoder_attention_mask=mask,
                                                   timestep=t, added_cond_kwargs=no_res, return_dict=False)[0][:, :4],
                       "dit", "tokenizer mask (as PixArt's training)"),
            "ldm_dit": ("ldm_dit", lambda m, x, t: m(x, t, emb, mask, return_dict=False)[0][:, :4], "dit",
                        "tokenizer mask (as train_t2i)"),
            "ldm_dit_77": ("ldm_dit", lambda m, x, t: m(x, t, emb, ones, return_dict=False)[0][:, :4], "dit",
                           "all ones (77 tokens, nothing dropped)"),
        })
    return models, calls, mask


def step_summary(out: dict, times: dict) -> None:
    """GFLOP/s and ours / diffusers ratios per row (in place)."""
    for name, row in out["rows"].items():
        ts = times[name]
        row.update(median_s=round(med(ts), 3), min_s=round(min(ts), 3), runs_s=[round(v, 3) for v in ts],
                   images_per_s=round(BATCH / med(ts), 3), gflops=round(row["gflop"] / med(ts), 1),
                   gflops_min=round(row["gflop"] / min(ts), 1))
    for name, row in out["rows"].items():
        ref_name = "diffusers_unet" if row["pair"] == "unet" else "pixart"
        ref = out["rows"][ref_name]
        row["ratio"] = round(row["gflops"] / ref["gflops"], 3)  # ours / diffusers, GFLOP/s, medians
        row["ratio_min"] = round(row["gflops_min"] / ref["gflops_min"], 3)
        row["ratio_paired"] = round(med([b / a for a, b in zip(times[name], times[ref_name])])
                                    * row["gflop"] / ref["gflop"], 3)


def run_step(args, tok) -> dict:
    """Section 2; see the module docstring. Mirrors bench-diffusers' ``run_train`` for every model."""
    from diffusers import DDPMScheduler

    reps = args.step_rounds
    log("step: building the denoisers")
    models, calls, mask = step_models(args, tok)
    sched = DDPMScheduler.from_config(build_scheduler().config)
    latents = torch.randn(BATCH, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)) * 0.18215
    optimizers = {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)

    def make_step(key):
        model_name, forward = calls[key][0], calls[key][1]
        model, opt, g = models[model_name], optimizers[model_name], torch.Generator().manual_seed(0)

        def step():  # bench-diffusers' run_train step
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (BATCH,), generator=g)
            noisy = sched.add_noise(latents, noise, t)
            loss = torch.nn.functional.mse_loss(forward(model, noisy, t).float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {k: make_step(k) for k in calls}
    out = {"batch": BATCH, "latent": LATENT, "text_tokens": int(mask.shape[1]),
           "real_tokens_per_row": int(mask[0].sum()), "optimizer": "AdamW fp32, lr 1e-4", "rows": {}}
    for name, (model_name, _, pair, mask_note) in calls.items():
        executed, by_op = count_flops(fns[name], no_grad=False, by_op=True)  # also the warm-up step
        attention = {k: v for k, v in by_op.items() if "scaled_dot_product" in k}
        out["rows"][name] = {"pair": pair, "params_M": round(n_params(models[model_name]) / 1e6, 2),
                             "text_mask": mask_note, "gflop_executed": round(executed / 1e9, 2),
                             "gflop_attention_executed": {k.split(".")[-1]: round(v / 1e9, 2)
                                                          for k, v in attention.items()}}
    for name, row in out["rows"].items():  # the architecture's FLOPs: at 77 tokens, what diffusers computes
        row["gflop"] = out["rows"][calls[name][0] + "_77" if name.startswith("ldm_") else name]["gflop_executed"]
        log(f"step: {name} {row['gflop']} GFLOP/step ({row['gflop_executed']} executed)")
    log(f"step: timing {reps} interleaved rounds")
    times = interleaved(fns, warmup=0, reps=reps, no_grad=False,
                        after_round=lambda r: log(f"step round {r + 1}/{reps} done"))
    step_summary(out, times)
    for model in models.values():
        model.eval()
    return out


# ------------------------------------------------------------------------------------------------ report
def table(res: dict) -> str:
    lines = []
    ca = res.get("caching")
    if ca:
        d = ca["denoiser"]
        lines += [f"training throughput at {ca['pixels']} px: the library step (ldm.training_step), "
                  f"batch {ca['batch']}, fp32 AdamW, "
                  f"{ca['images']} PNGs ({ca['png_kb_per_image']:.0f} KB each), random_flip={ca['random_flip']}, "
                  f"{len(next(iter(ca['settings'].values()))['cached']['runs_s'])} interleaved rounds",
                  f"denoiser: ldm UNetModel {tuple(d['config']['block_out_channels'])}, head_dim "
                  f"{d['config']['attention_head_dim']}, cross-attn {d['config']['cross_attention_dim']} "
                  f"({d['params_M']}M); text encoder: CLIP {ca['text_encoder']['width']} x "
                  f"{ca['text_encoder']['layers']} layers ({ca['text_encoder']['params_M']}M)",
                  "speed-up: on-the-fly / cached step time (medians), r(min) from minima, r(pair) median over rounds; "
                  "GFLOP ratio = (VAE + text + step) / step",
                  f"{'VAE':24s} {'variant':10s} {'s/step':>7s} {'img/s':>6s} {'data ms':>8s} {'encode ms':>9s} "
                  f"{'train ms':>8s} {'speed-up':>8s} {'r(min)':>6s} {'r(pair)':>7s} {'GFLOP ratio':>11s}"]
        for name, s in ca["settings"].items():
            label = f"{'SD-1.x' if name == 'sd' else 'small'} {'/'.join(map(str, s['vae_channels']))}"
            for variant in ("cached", "on_the_fly"):
                r = s[variant]
                extra = (f"{s['speedup']:8.2f} {s['speedup_min']:6.2f} {s['speedup_paired']:7.2f} "
                         f"{s['flop_ratio']:11.2f}" if variant == "on_the_fly" else "")
                lines.append(f"{label:24s} {variant.replace('_', ' '):10s} {r['median_s']:7.2f} "
                             f"{r['images_per_s']:6.2f} {r['data_ms']:8.1f} {r['encode_ms']:9.1f} "
                             f"{r['train_ms']:8.1f} {extra}")
        for name, s in ca["settings"].items():
            pay = f"{s['payoff_epochs']:.2f} epochs" if s["payoff_epochs"] is not None else "never"
            lines.append(f"cache build, {name} VAE: {s['cache_build_s']:.1f} s for {ca['images']} images = "
                         f"{s['cache_build_s_per_image'] * 1e3:.0f} ms/image; pays off after {pay}")
    st = res.get("step")
    if st:
        lines += ["", f"training step: batch {st['batch']}, {st['latent']}x{st['latent']} latents, {st['text_tokens']} "
                      f"text tokens ({st['real_tokens_per_row']} real), {st['optimizer']}, fwd + bwd + step, "
                      f"{len(st['rows']['diffusers_unet']['runs_s'])} interleaved rounds",
                  "GFLOP: per step at 77 tokens (fwd + bwd); GFLOP ex: executed; ratio: GFLOP/s ours / diffusers "
                  "from medians, r(min) from minima, r(pair) median over rounds",
                  f"{'model':15s} {'text mask':38s} {'params M':>8s} {'GFLOP':>6s} {'GFLOP ex':>8s} {'med s':>6s} "
                  f"{'min s':>6s} {'img/s':>6s} {'GFLOP/s':>7s} {'ratio':>6s} {'r(min)':>6s} {'r(pair)':>7s}"]
        for name, r in st["rows"].items():
            ratio = ("" if name in ("diffusers_unet", "pixart") else
                     f"{r['ratio']:6.3f} {r['ratio_min']:6.3f} {r['ratio_paired']:7.3f}")
            lines.append(f"{name:15s} {r['text_mask'][:38]:38s} {r['params_M']:8.2f} {r['gflop']:6.1f} "
                         f"{r['gflop_executed']:8.1f} {r['median_s']:6.2f} {r['min_s']:6.2f} {r['images_per_s']:6.2f} "
                         f"{r['gflops']:7.1f} {ratio}")
    return "\n".join(lines + footer_lines(res))


def main() -> None:
    sections = ("caching", "step")
    ap = bench_parser(__doc__, sections, "fewer images and rounds")
    ap.add_argument("--images", type=int, default=0, help="PNGs in the data set (default 16, --quick 8)")
    ap.add_argument("--caching-rounds", type=int, default=0, help="interleaved rounds (default 3, --quick 2)")
    ap.add_argument("--step-rounds", type=int, default=0, help="interleaved rounds (default 4, --quick 2)")
    ap.add_argument("--random-flip", action="store_true",
                    help="train with --random_flip (the cache then encodes every image twice)")
    ap.add_argument("--no-dit", action="store_true", help="step: only the U-Nets")
    args = ap.parse_args()
    only = parse_only(ap, args, sections)
    args.images = args.images or (8 if args.quick else 16)
    args.caching_rounds = args.caching_rounds or (2 if args.quick else 3)
    args.step_rounds = args.step_rounds or (2 if args.quick else 4)
    if args.images < BATCH:
        ap.error(f"--images must be at least the batch ({BATCH})")

    torch.set_num_threads(args.threads)
    quiet(datasets_too=True)
    from ldm.tokenizer import load_tokenizer

    res = {"env": env_record(torch.get_num_threads())}
    tok = load_tokenizer()
    if "caching" in only:
        with tempfile.TemporaryDirectory(prefix="ldm-bench-training-") as tmp:
            res["caching"] = run_caching(args, tok, Path(tmp))
    if "step" in only:
        res["step"] = run_step(args, tok)
    res["env"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    res["wall_s"] = round(time.perf_counter() - T0, 1)
    res["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    res["targets"] = {}
    if "caching" in res:
        res["targets"]["caching_speedup_ge_2_sd_vae"] = res["caching"]["settings"]["sd"]["speedup"] >= 2.0
    if "step" in res:
        for k in ("ldm_unet", "ldm_dit"):
            if k in res["step"]["rows"]:
                res["targets"][f"{k}_step_ratio_ge_1"] = res["step"]["rows"][k]["ratio"] >= 1.0
    print(table(res))
    print(json.dumps(res, separators=(",", ":")))
    log("done")


if __name__ == "__main__":
    main()
