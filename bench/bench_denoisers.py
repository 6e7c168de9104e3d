"""ldm's denoisers and LatentPipeline against diffusers, in one process, measurements interleaved.

    python bench/bench_denoisers.py                 # ~3 min on 2 cores
    python bench/bench_denoisers.py --quick         # fewer repeats, ~1.5 min
    python bench/bench_denoisers.py --only denoiser # or: pipeline

1. denoiser: one forward (fp32, eager, no_grad, batch 2 = the classifier-free-guidance batch, 32x32 latents, 77 CLIP
   tokens of width 256) of
     diffusers UNet2DConditionModel  vs ldm UNetModel   (same layout, FLOPs matched to <0.1%)
     diffusers PixArtTransformer2DModel vs ldm DiTModel (11 x 512, patch 2, adaLN-single, learned sigma)
   Each model is called as its pipeline calls it: SD passes no text mask, PixArt and LatentPipeline pass one.
   ldm also runs with an all-ones mask (nothing to drop), which times the same 77-token work as diffusers, and the
   U-Net with head_dim 16 (8 heads at 32x32 like diffusers' UNet, whose 8 heads per level no single head_dim gives).
   FLOPs come from FlopCounterMode plus a formula for the CPU flash-attention kernel (which it does not count).
2. pipeline: LatentPipeline (ldm UNet / DiT) and diffusers' StableDiffusionPipeline, 20 DDIM steps, guidance 7.5,
   256 px, output_type "pil" and "latent", timed with hooks inside each run: the share of the run spent outside
   the denoiser and the VAE decode (text encoder, scheduler.step, postprocess, Python glue) should be < 1 %.

Prints a table, then one JSON line. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import json
import os
import time

from common import (  # bench/common.py: also sets the HF offline switches and puts the repo root on sys.path
    LATENT, NEGATIVE, PROMPT, T0, build_diffusers_unet, build_ldm_dit, build_ldm_unet, build_pixart, build_scheduler,
    bench_parser, build_text_encoder, build_vae, count_flops, env_record, footer_lines, interleaved, log, med, n_params,
    parse_only, quiet,
)

import torch  # noqa: E402

BATCH, STEPS, GUIDANCE, PIXELS = 2, 20, 7.5, 256


class Instrument:
    """Times the parts of one pipeline call with hooks on the instances (bench-diffusers' method)."""

    def __init__(self, pipe, denoiser_attr: str):
        self.pipe, self.den, self.t, self.n, self._undo = pipe, denoiser_attr, {}, {}, []

    def _acc(self, key, dt):
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1

    def _wrap_method(self, obj, attr, key):
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self._acc(key, time.perf_counter() - t)

        setattr(obj, attr, wrapped)
        self._undo.append(lambda: delattr(obj, attr) if attr in obj.__dict__ else None)

    def _wrap_module(self, mod, key):
        start = {}

        def pre(m, a):
            start["t"] = time.perf_counter()

        def post(m, a, o):
            self._acc(key, time.perf_counter() - start["t"])

        self._undo += [mod.register_forward_pre_hook(pre).remove, mod.register_forward_hook(post).remove]

    def __enter__(self):
        p = self.pipe
        self._wrap_module(getattr(p, self.den), "denoiser")
        self._wrap_module(p.text_encoder, "text_encoder")
        self._wrap_method(p.scheduler, "step", "scheduler_step")
        self._wrap_method(p.vae, "decode", "vae_decode")
        self._wrap_method(p.image_processor, "postprocess", "postprocess")
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()


# ------------------------------------------------------------------------------------------------ sections
def text_inputs(tokenizer, text_encoder):
    """The CFG batch the pipelines build: [negative, prompt] -> embeddings (2, 77, 256), mask (2, 77)."""
    enc = tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = text_encoder(enc.input_ids)[0]
    return emb, enc.attention_mask


def run_denoisers(c: dict, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    t = torch.full((BATCH,), 500, dtype=torch.long)
    emb, mask = c["text"]
    ones = torch.ones_like(mask)
    du, dp, lu, ld, lu16 = c["diffusers_unet"], c["pixart"], c["ldm_unet"], c["ldm_dit"], c["ldm_unet_hd16"]
    no_res = {"resolution": None, "aspect_ratio": None}

    def ldm(model, m):
        return lambda: model(x, t, emb, m, return_dict=False)

    # name -> (model, call, pair, the text mask it gets)
    rows = {
        "diffusers_unet": (du, lambda: du(x, t, encoder_hidden_states=emb, return_dict=False), "unet",
                           "none (as StableDiffusionPipeline)"),
        "ldm_unet": (lu, ldm(lu, mask), "unet", "tokenizer mask (as LatentPipeline)"),
        "ldm_unet_77": (lu, ldm(lu, ones), "unet", "all ones (77 tokens, nothing dropped)"),
        "ldm_unet_hd16": (lu16, ldm(lu16, mask), "unet", "tokenizer mask; head_dim 16"),
        "pixart": (dp, lambda: dp(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                                  added_cond_kwargs=no_res, return_dict=False), "dit",
                   "tokenizer mask (as PixArtAlphaPipeline)"),
        "ldm_dit": (ld, ldm(ld, mask), "dit", "tokenizer mask (as LatentPipeline)"),
        "ldm_dit_77": (ld, ldm(ld, ones), "dit", "all ones (77 tokens, nothing dropped)"),
    }
    out = {"batch": BATCH, "latent": LATENT, "text_tokens": int(mask.shape[1]),
           "real_tokens_per_row": mask.sum(1).tolist(), "rows": {}}
    for name, (model, fn, pair, mask_note) in rows.items():
        # gflop: the architecture's FLOPs (all 77 tokens; what diffusers computes); gflop_executed: this call's
        nominal = fn if not name.startswith("ldm_") else ldm(model, ones)
        out["rows"][name] = {"pair": pair, "params_M": round(n_params(model) / 1e6, 2),
                             "gflop": round(count_flops(nominal) / 1e9, 3),
                             "gflop_executed": round(count_flops(fn) / 1e9, 3), "text_mask": mask_note}
        if name.startswith("ldm_unet"):
            out["rows"][name]["heads_per_level"] = heads(model)
    log("denoiser FLOPs counted; timing", reps, "interleaved rounds")
    times = interleaved({k: v[1] for k, v in rows.items()}, warmup=2, reps=reps)
    for name, row in out["rows"].items():
        ts = times[name]
        row.update(median_ms=round(med(ts) * 1e3, 1), min_ms=round(min(ts) * 1e3, 1),
                   runs_ms=[round(v * 1e3, 1) for v in ts])
        row["gflops"] = round(row["gflop"] / med(ts), 1)  # architecture FLOPs / median time
        row["gflops_min"] = round(row["gflop"] / min(ts), 1)
    for name, row in out["rows"].items():
        ref = out["rows"]["diffusers_unet" if row["pair"] == "unet" else "pixart"]
        row["ratio"] = round(row["gflops"] / ref["gflops"], 3)  # ours / diffusers, GFLOP/s, medians
        row["ratio_min"] = round(row["gflops_min"] / ref["gflops_min"], 3)
        # median over rounds of (time diffusers / time ours) x (FLOPs ours / FLOPs diffusers): pairs adjacent runs
        ref_name = "diffusers_unet" if row["pair"] == "unet" else "pixart"
        row["ratio_paired"] = round(med([b / a for a, b in zip(times[name], times[ref_name])])
                                    * row["gflop"] / ref["gflop"], 3)
    return out


def run_pipelines(c: dict, reps: int) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines import LatentPipeline

    sched = c["scheduler"]
    pipes = {
        "ldm_unet": (LatentPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    denoiser=c["ldm_unet"], scheduler=DDIMScheduler.from_config(sched.config)),
                     "denoiser"),
        "ldm_dit": (LatentPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   denoiser=c["ldm_dit"], scheduler=DDIMScheduler.from_config(sched.config)),
                    "denoiser"),
        "diffusers_sd": (StableDiffusionPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["diffusers_unet"],
            scheduler=DDIMScheduler.from_config(sched.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False), "unet"),
    }
    for pipe, _ in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    def call(pipe, otype, steps=STEPS):
        return pipe(PROMPT, height=PIXELS, width=PIXELS, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    output_type=otype, generator=torch.Generator().manual_seed(0))

    configs = [(name, otype) for name in pipes for otype in ("pil", "latent")]
    for name, otype in configs:  # warm-up: first-call allocations, lazy imports
        call(pipes[name][0], otype, steps=2)
    runs = {cfg: [] for cfg in configs}
    for r in range(reps):
        for name, otype in configs:
            pipe, den_attr = pipes[name]
            with Instrument(pipe, den_attr) as ins:
                t = time.perf_counter()
                images = call(pipe, otype)
                total = time.perf_counter() - t
            runs[(name, otype)].append(dict(ins.t, total=total, calls=dict(ins.n)))
            if r == 0 and otype == "pil":
                assert images.images[0].size == (PIXELS, PIXELS), images.images[0].size
        log(f"pipeline round {r + 1}/{reps} done")
    out = {"steps": STEPS, "guidance_scale": GUIDANCE, "pixels": PIXELS, "configs": {}}
    for (name, otype), rs in runs.items():
        outside = [100 * (r["total"] - r.get("denoiser", 0) - r.get("vae_decode", 0)) / r["total"] for r in rs]
        outside_den = [100 * (r["total"] - r.get("denoiser", 0)) / r["total"] for r in rs]
        i = sorted(range(len(rs)), key=lambda j: rs[j]["total"])[len(rs) // 2]  # the median run, for the breakdown
        parts = {k: round(v * 1e3, 1) for k, v in rs[i].items() if k not in ("calls", "total")}
        parts["other"] = round(rs[i]["total"] * 1e3 - sum(parts.values()), 1)
        out["configs"][f"{name}_{otype}"] = {
            "total_s": round(med([r["total"] for r in rs]), 3),
            "runs_s": [round(r["total"], 3) for r in rs],
            "outside_denoiser_and_decode_pct": round(med(outside), 3),
            "outside_denoiser_and_decode_pct_max": round(max(outside), 3),
            "measured_outside_denoiser_pct": round(med(outside_den), 2),  # bench-diffusers' figure
            "outside_ms": round(med([r["total"] - r.get("denoiser", 0) - r.get("vae_decode", 0) for r in rs]) * 1e3,
                                1),
            "breakdown_ms_median_run": parts,
            "calls": rs[i]["calls"],
        }
    return out


# ------------------------------------------------------------------------------------------------ report
def heads(model) -> str:
    ch, hd = model.config.block_out_channels, model.config.attention_head_dim
    return "/".join(str(c // hd) for c in ch)


def table(res: dict) -> str:
    lines = []
    den = res.get("denoiser")
    if den:
        lines += [f"denoiser forward: batch {den['batch']}, {den['latent']}x{den['latent']} latents, "
                  f"{den['text_tokens']} text tokens ({den['real_tokens_per_row']} real per row), fp32, "
                  f"{res['env']['threads']} threads, {len(den['rows']['pixart']['runs_ms'])} interleaved rounds",
                  "GFLOP: the architecture's FLOPs per forward (77 tokens); GFLOP ex: executed in this call; "
                  "GFLOP/s = GFLOP / median; ratio: GFLOP/s ours / diffusers from medians, r(min) from minima, "
                  "r(pair) median over rounds",
                  f"{'model':15s} {'text mask':38s} {'heads':>7s} {'params M':>8s} {'GFLOP':>6s} {'GFLOP ex':>8s} "
                  f"{'med ms':>7s} {'min ms':>7s} {'GFLOP/s':>7s} {'ratio':>6s} {'r(min)':>6s} {'r(pair)':>7s}"]
        for name, r in den["rows"].items():
            ratio = ("" if name in ("diffusers_unet", "pixart") else f"{r['ratio']:6.3f} {r['ratio_min']:6.3f} "
                     f"{r['ratio_paired']:7.3f}")
            lines.append(f"{name:15s} {r['text_mask'][:38]:38s} {HEADS.get(name, r.get('heads_per_level', '')):>7s} "
                         f"{r['params_M']:8.2f} {r['gflop']:6.2f} {r['gflop_executed']:8.2f} {r['median_ms']:7.1f} "
                         f"{r['min_ms']:7.1f} {r['gflops']:7.1f} {ratio}")
    pipe = res.get("pipeline")
    if pipe:
        lines += ["", f"pipeline: {pipe['steps']} DDIM steps, guidance {pipe['guidance_scale']}, {pipe['pixels']} px, "
                      f"median of {len(next(iter(pipe['configs'].values()))['runs_s'])} interleaved runs; outside % = "
                      f"(total - denoiser - vae.decode) / total (target < 1 %); excl. den. % = (total - denoiser) "
                      f"/ total",
                  f"{'pipeline':20s} {'total s':>8s} {'outside %':>9s} {'(max)':>6s} {'outside ms':>10s} "
                  f"{'excl. den. %':>12s}  breakdown of the median run (ms)"]
        for name, r in pipe["configs"].items():
            b = r["breakdown_ms_median_run"]
            brk = ", ".join(f"{k} {v:.0f}" if v >= 10 else f"{k} {v:.1f}" for k, v in b.items())
            lines.append(f"{name:20s} {r['total_s']:8.2f} {r['outside_denoiser_and_decode_pct']:9.2f} "
                         f"{r['outside_denoiser_and_decode_pct_max']:6.2f} {r['outside_ms']:10.1f} "
                         f"{r['measured_outside_denoiser_pct']:12.2f}  {brk}")
    return "\n".join(lines + footer_lines(res))


HEADS = {"diffusers_unet": "8/8/8", "pixart": "8", "ldm_dit": "8", "ldm_dit_77": "8"}


def main() -> None:
    sections = ("denoiser", "pipeline")
    ap = bench_parser(__doc__, sections, "fewer repeats (4 denoiser rounds, 2 pipeline runs)")
    ap.add_argument("--repeats", type=int, default=0, help="denoiser rounds (default 10, --quick 4)")
    ap.add_argument("--pipeline-repeats", type=int, default=0, help="runs per pipeline config (default 3, --quick 2)")
    ap.add_argument("--unet-head-dim", type=int, default=32,
                    help="ldm UNet attention_head_dim (default 32: 4/8/12 heads; diffusers has 8/8/8)")
    args = ap.parse_args()
    only = parse_only(ap, args, sections)
    reps = args.repeats or (4 if args.quick else 10)
    pipe_reps = args.pipeline_repeats or (2 if args.quick else 3)

    torch.set_num_threads(args.threads)
    quiet()
    from ldm.tokenizer import load_tokenizer

    res = {"env": env_record(torch.get_num_threads())}
    log("building components")
    tok = load_tokenizer()
    c = {"tokenizer": tok, "text_encoder": build_text_encoder(tok), "vae": build_vae(),
         "diffusers_unet": build_diffusers_unet(), "pixart": build_pixart(),
         "ldm_unet": build_ldm_unet(args.unet_head_dim), "ldm_unet_hd16": build_ldm_unet(16),
         "ldm_dit": build_ldm_dit(), "scheduler": build_scheduler()}
    c["text"] = text_inputs(tok, c["text_encoder"])
    res["env"]["ldm_unet_heads_per_level"] = heads(c["ldm_unet"])
    res["env"]["attn_processors"] = {k: sorted({type(p).__name__ for p in c[k].attn_processors.values()})
                                     for k in ("diffusers_unet", "ldm_unet", "pixart", "ldm_dit")}
    if "denoiser" in only:
        res["denoiser"] = run_denoisers(c, reps)
    if "pipeline" in only:
        log(f"pipelines: {pipe_reps} interleaved runs per config")
        res["pipeline"] = run_pipelines(c, pipe_reps)
    res["env"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    res["wall_s"] = round(time.perf_counter() - T0, 1)
    res["targets"] = {}
    if "denoiser" in res:
        rows = res["denoiser"]["rows"]
        for k in ("ldm_unet", "ldm_dit"):
            res["targets"][f"{k}_ratio_ge_1.05"] = rows[k]["ratio"] >= 1.05
            res["targets"][f"{k}_ratio_min_ge_1.05"] = rows[k]["ratio_min"] >= 1.05
    if "pipeline" in res:
        for k, r in res["pipeline"]["configs"].items():
            if k.startswith("ldm_"):
                res["targets"][f"{k}_outside_lt_1pct"] = r["outside_denoiser_and_decode_pct"] < 1.0
    print(table(res))
    print(json.dumps(res, separators=(",", ":")))
    log("done")


if __name__ == "__main__":
    main()
