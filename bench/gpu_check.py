"""The GPU check (run by ``bench/gpu_check.sh`` on a lent accelerator; ``--smoke`` runs it tiny on the CPU).

Prints one line per figure, then one JSON line:

1. ``peak``: the bf16 GEMM peak this device reaches (8192^3 matmuls), the MFU reference.
2. ``train``: bf16-autocast training steps (AdamW, the library's v-loss on random latents and text tokens) of DiT-B/2
   and ``unet-b`` at 256 px (32 x 32 x 4 latents, 77 text tokens of width 768), batch 32: images/s and MFU
   (FLOPs per step from torch's FlopCounterMode, SDPA's counted by formula).
3. ``attention``: the same DiT step with torch SDPA and with xformers (when installed).
4. ``pipeline``: a 256 px LatentPipeline (random components) in fp16 and bf16, 20 steps, with and without
   ``enable_model_cpu_offload()``: seconds per image and peak memory.
FSDP through accelerate is the shell script's separate step (``accelerate launch --use_fsdp``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, warmup: int, reps: int, device) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup``, synchronising the device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gemm_peak(device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n ** 3 / timed(lambda: a @ b, 3, 10, device)


def train_step_fn(model, batch: int, latent: int, width: int, device):
    """One bf16-autocast training step of ``model`` (v-loss, AdamW) and its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, latent, latent, device=device)
    context = torch.randn(batch, 77, width, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, t, context).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    return step, counter.get_total_flops()


def run_train(args, device, peak: float) -> dict:
    from ldm import DiTModel, UNetModel, dit_size_config, unet_size_config

    latent, width = (8, 64) if args.smoke else (32, 768)
    batch = 2 if args.smoke else 32
    smoke_dit = dict(depth=2, hidden_size=64, num_attention_heads=2) if args.smoke else {}
    dit_cfg = dict(dit_size_config("dit-b/2"), **smoke_dit)
    unet_cfg = unet_size_config("unet-b") if not args.smoke else dict(block_out_channels=(32, 64),
                                                                      attention_levels=(False, True),
                                                                      layers_per_block=1, attention_head_dim=16)
    out = {}
    for name, model in (("DiT-B/2", DiTModel(sample_size=latent, cross_attention_dim=width, **dit_cfg)),
                        ("unet-b", UNetModel(sample_size=latent, cross_attention_dim=width, norm_num_groups=8 if
                                             args.smoke else 32, **unet_cfg))):
        step, flops = train_step_fn(model, batch, latent, width, device)
        seconds = timed(step, 2, args.reps, device)
        out[name] = {"images_per_s": round(batch / seconds, 2), "tflop_per_step": round(flops / 1e12, 3),
                     "mfu": round(flops / seconds / peak, 4)}
        print(f"train {name}: {out[name]}", flush=True)
        if name == "DiT-B/2":
            out["attention"] = run_attention(model, step, batch, device, args)
        model.to("cpu")
    return out


def run_attention(model, step, batch: int, device, args) -> dict:
    import importlib.util

    result = {"sdpa_images_per_s": round(batch / timed(step, 1, args.reps, device), 2)}
    if importlib.util.find_spec("xformers") is None or device.type != "cuda":
        result["xformers"] = "not installed" if device.type == "cuda" else "needs CUDA"
    else:
        model.enable_xformers_memory_efficient_attention()
        result["xformers_images_per_s"] = round(batch / timed(step, 1, args.reps, device), 2)
        model.disable_xformers_memory_efficient_attention()
    print(f"attention DiT-B/2: {result}", flush=True)
    return result


def run_pipeline(args, device) -> dict:
    from ldm.tiny import tiny_pipeline

    out = {}
    size = 32 if args.smoke else 256
    for dtype in (torch.float16, torch.bfloat16):
        for offload in (False, True):
            if offload and device.type != "cuda":
                continue
            pipe = tiny_pipeline("dit")
            pipe.to(dtype=dtype)
            pipe.enable_model_cpu_offload() if offload else pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def call():
                pipe("a red fox", num_inference_steps=2 if args.smoke else 20, height=size, width=size,
                     generator=torch.Generator().manual_seed(0))

            key = f"{str(dtype).split('.')[-1]}{'-offload' if offload else ''}"
            out[key] = {"s_per_image": round(timed(call, 1, args.reps, device), 4)}
            if device.type == "cuda":
                out[key]["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
            print(f"pipeline {key}: {out[key]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check that the script runs)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = gemm_peak(device, 512 if args.smoke else 8192)
    print(f"peak bf16 GEMM: {peak / 1e12:.2f} TFLOP/s on {device}", flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_bf16_tflops": round(peak / 1e12, 2),
              "train": run_train(args, device, peak), "pipeline": run_pipeline(args, device)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
