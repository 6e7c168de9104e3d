"""Command line: ``ldm generate --model PATH_OR_HUB_ID "a red fox" --steps 50 --seed 0 -o fox.png``.

Several prompts and ``--num_images`` > 1 produce a grid (one row per prompt).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def _parser() -> argparse.ArgumentParser:
    from ldm import __version__

    parser = argparse.ArgumentParser(prog="ldm", description="ldm: latent text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a saved pipeline in another layout")
    export.add_argument("--portable", nargs=2, metavar=("SOURCE", "TARGET"), required=True,
                        help="diffusers' remote-code layout: DiffusionPipeline.from_pretrained(TARGET, "
                             "trust_remote_code=True) loads it without ldm installed")
    gen = sub.add_parser("generate", help="generate images from prompts with a saved LatentPipeline")
    gen.add_argument("prompts", nargs="+", help="one or more prompts (one grid row each)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pipeline folder or Hub id (saved with LatentPipeline.save_pretrained)")
    source.add_argument("--tiny", choices=["unet", "dit"],
                        help="use a tiny randomly initialised offline pipeline (a smoke test: it draws noise)")
    gen.add_argument("-o", "--output", default="ldm.png", help="output PNG (a grid when several images)")
    gen.add_argument("--steps", type=int, default=None,
                     help="sampling steps (default: 50, or the step count a distilled model was made for)")
    gen.add_argument("--guidance_scale", "--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the model's, else 7.5)")
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--num_images", type=int, default=1, help="images per prompt (grid columns)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                     help="swap the saved scheduler for this diffusers one (from_config)")
    gen.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda if available)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    gen.add_argument("--xformers", action="store_true", help="use xformers attention (needs the xformers extra)")
    gen.add_argument("--threads", type=int, default=None,
                     help="CPU threads (default: OMP_NUM_THREADS, else the idle CPUs: cores minus those busy now)")
    gen.add_argument("--output_dir", default=None, help="also write every image here (<row>-<column>.png)")
    return parser


def resolve_device(name: str | None) -> str:
    """``--device``: cuda when it is there (default), else cpu; a device this machine lacks is a clear error."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu, cuda, cuda:1, mps.") from err
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"--device {name}: this machine has no {device.type} device; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices.")
    return name


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs that other processes keep busy now: the non-idle share of the machine's CPU time in ``/proc/stat`` over
    ``interval`` seconds, during which this process sleeps. Where ``/proc/stat`` is missing, the 1-minute load
    average (which also counts this process's own recent work: the imports, a pip install before it)."""
    import os
    import time

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(interval)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def default_threads(busy: float | None = None) -> int:
    """CPU threads for torch when neither ``--threads`` nor ``OMP_NUM_THREADS`` says: the CPUs this process may
    use minus those other processes keep busy (``busy``, default ``busy_cpus()``), at least 1. torch's default (every
    core) makes a busy 2-core machine ~10x slower (93.8 s instead of 8.3 s for the quick start); the 1-minute load
    average, used before, counted this process's own imports and picked 1 thread on an idle 2-core machine after a
    fresh install (the main command's sampling took 87.5 s instead of 48.1 s)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cpus() if busy is None else busy
    return max(1, min(cpus, round(cpus - busy)))


def set_threads(threads: int | None) -> None:
    import os

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())


def generate(args: argparse.Namespace) -> Path:
    import diffusers
    import torch
    from diffusers.utils import make_image_grid
    from packaging import version

    from pipelines import LatentPipeline

    device = resolve_device(args.device)
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from ldm.tiny import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=False)
    else:
        # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name prints a FutureWarning)
        dtype_key = "dtype" if version.parse(diffusers.__version__) >= version.parse("0.42") else "torch_dtype"
        pipe = LatentPipeline.from_pretrained(args.model, **{dtype_key: dtype})
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.to(device)
    if args.xformers:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--xformers needs the xformers package (pip install 'ldm-hf[xformers]', GPU only); "
                             "without it the default torch SDPA attention is used.")
        pipe.enable_xformers_memory_efficient_attention()

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(
        list(args.prompts), num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images, generator=generator,
        height=args.height, width=args.width, eta=args.eta,
    ).images
    elapsed = time.perf_counter() - start
    grid = images[0] if len(images) == 1 else make_image_grid(images, rows=len(args.prompts), cols=args.num_images)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(images)} image(s), {grid.width}x{grid.height}) in {elapsed:.1f} s")
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i // args.num_images:02d}-{i % args.num_images:02d}.png")
        print(f"wrote {len(images)} images to {folder}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "export":
            from ldm.export import export_portable

            print(f"wrote {export_portable(*args.portable)}")
    except (ValueError, OSError) as err:
        print(f"ldm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_script(name: str, main, parse_args) -> None:
    """``main(parse_args())`` for the scripts of ``training/``: a clear error (bad arguments or data, missing files,
    a stopped run) ends the script with one line and exit status 1 instead of a traceback; Ctrl-C with 130."""
    import logging

    try:
        main(parse_args())
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        logging.getLogger(name).error("%s", err)
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the last complete checkpoint is kept (resume with --resume_from_checkpoint "
              "latest where the script takes it).", file=sys.stderr)
        sys.exit(130)
