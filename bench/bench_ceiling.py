#!/usr/bin/env python
"""How close the denoisers get to this CPU's measured ceiling, fp32 and bf16 (issue 17), in one process.

    OMP_NUM_THREADS=2 python bench/bench_ceiling.py            # 256 px latents (32 x 32), about 10 min on 2 cores
    python bench/bench_ceiling.py --quick                      # tiny sizes: checks that it runs

Prints, from interleaved timings (A, B, C, ... per round; medians):

* the GEMM ceilings it measures itself: fp32 through torch.matmul (MKL), fp32 through oneDNN
  (``torch.utils.mkldnn`` linear on mkldnn tensors) and bf16 matmul (oneDNN), at the shapes of the denoisers' linears;
* per denoiser (ldm U-Net and DiT, diffusers' UNet2DConditionModel and PixArt of the same layout), forward GFLOP/s
  in fp32 and under bf16 autocast, as a fraction of the best fp32 ceiling and of the bf16 one;
* ours / diffusers per FLOP (fp32 forward);
* the bf16 / fp32 speed ratio of a full training step (forward, backward, AdamW) for both ldm denoisers.

Run it on a quiet machine: another process on the cores changes every figure (ratios within one run hold better).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (bench_parser, build_diffusers_unet, build_ldm_dit, build_ldm_unet, build_pixart,  # noqa: E402
                    count_flops, env_record, interleaved, log, med)

import torch  # noqa: E402


def gemm_ceilings(n: int, k: int, m: int, reps: int) -> dict:
    """GFLOP/s of an (n x k) @ (k x m) product: fp32 MKL, fp32 oneDNN linear, bf16."""
    from torch.utils import mkldnn

    x, w = torch.randn(n, k), torch.randn(m, k)
    linear = torch.nn.Linear(k, m, bias=False)
    linear.weight.data.copy_(w)
    onednn, xm = mkldnn.to_mkldnn(linear), x.to_mkldnn()
    xb, wb = x.bfloat16(), w.bfloat16()
    fns = {"fp32_mkl": lambda: x @ w.T, "fp32_onednn": lambda: onednn(xm), "bf16": lambda: xb @ wb.T}
    times = interleaved(fns, warmup=2, reps=reps)
    return {name: round(2 * n * k * m / med(ts) / 1e9, 1) for name, ts in times.items()}


def denoiser_rows(quick: bool, reps: int) -> dict:
    """Forward GFLOP/s per denoiser, fp32 and bf16 autocast, batch 2 at the bench latent size."""
    from common import LATENT, TEXT_WIDTH

    batch, latent = 2, (8 if quick else LATENT)
    x = torch.randn(batch, 4, latent, latent)
    t = torch.full((batch,), 500)
    emb = torch.randn(batch, 77, TEXT_WIDTH)
    models = {"ldm_unet": build_ldm_unet(64), "ldm_dit": build_ldm_dit(),
              "diffusers_unet": build_diffusers_unet(), "pixart": build_pixart()}
    calls = {
        "ldm_unet": lambda m: m(x, t, emb, return_dict=False),
        "ldm_dit": lambda m: m(x, t, emb, return_dict=False),
        "diffusers_unet": lambda m: m(x, t, encoder_hidden_states=emb, return_dict=False),
        "pixart": lambda m: m(x, encoder_hidden_states=emb, timestep=t,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False),
    }
    fns, flops = {}, {}
    for name, model in models.items():
        flops[name] = count_flops(lambda: calls[name](model))
        fns[f"{name}_fp32"] = lambda n=name: calls[n](models[n])
        fns[f"{name}_bf16"] = lambda n=name: _autocast(lambda: calls[n](models[n]))
    log("timing", len(fns), "denoiser calls,", reps, "rounds")
    times = interleaved(fns, warmup=1, reps=reps)
    return {key: round(flops[key.rsplit("_", 1)[0]] / med(ts) / 1e9, 1) for key, ts in times.items()}


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def training_ratio(quick: bool, reps: int) -> dict:
    """Seconds of one training step (batch 8), fp32 / bf16 autocast, for both ldm denoisers."""
    from common import LATENT, TEXT_WIDTH

    latent = 8 if quick else LATENT
    x, t, emb = torch.randn(8, 4, latent, latent), torch.randint(0, 1000, (8,)), torch.randn(8, 77, TEXT_WIDTH)
    fns = {}
    for name, model in (("ldm_unet", build_ldm_unet(64)), ("ldm_dit", build_ldm_dit())):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(m=model, o=opt, bf16=False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m(x, t, emb).sample.float().square().mean()
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        fns[f"{name}_fp32"] = step
        fns[f"{name}_bf16"] = lambda s=step: s(bf16=True)
    times = interleaved(fns, warmup=1, reps=reps, no_grad=False)
    return {name: round(med(times[f"{name}_fp32"]) / med(times[f"{name}_bf16"]), 2) for name in ("ldm_unet", "ldm_dit")}


def main() -> None:
    ap = bench_parser(__doc__, ("all",), "tiny sizes and 2 rounds: checks that it runs")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    size = 256 if args.quick else 2048
    peaks = gemm_ceilings(size, size // 2, size // 2, reps)
    fp32_peak = max(peaks["fp32_mkl"], peaks["fp32_onednn"])
    speeds = denoiser_rows(args.quick, reps)
    lines = [f"GEMM ceilings (GFLOP/s): fp32 MKL {peaks['fp32_mkl']}, fp32 oneDNN {peaks['fp32_onednn']}, "
             f"bf16 {peaks['bf16']}", "",
             "| denoiser | fp32 GFLOP/s | of the fp32 ceiling | bf16 GFLOP/s | of the bf16 ceiling |",
             "|---|---|---|---|---|"]
    for name in ("ldm_unet", "ldm_dit", "diffusers_unet", "pixart"):
        fp32, bf16 = speeds[f"{name}_fp32"], speeds[f"{name}_bf16"]
        lines.append(f"| {name} | {fp32} | {100 * fp32 / fp32_peak:.0f} % | {bf16} | "
                     f"{100 * bf16 / peaks['bf16']:.0f} % |")
    ours = {"unet": speeds["ldm_unet_fp32"] / speeds["diffusers_unet_fp32"],
            "dit": speeds["ldm_dit_fp32"] / speeds["pixart_fp32"]}
    ratios = training_ratio(args.quick, reps)
    lines += ["", f"ours / diffusers per FLOP (fp32 forward): U-Net {ours['unet']:.2f}, DiT {ours['dit']:.2f}",
              f"training step bf16 / fp32 speed-up: U-Net {ratios['ldm_unet']}x, DiT {ratios['ldm_dit']}x"]
    print("\n".join(lines))
    print(json.dumps({"env": env_record(args.threads), "gemm": peaks, "denoisers": speeds, "ours_vs_diffusers": ours,
                      "training_bf16_speedup": ratios}))


if __name__ == "__main__":
    main()
