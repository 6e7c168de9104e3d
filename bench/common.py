"""Pieces shared by the bench scripts: offline seeded components at the diffusers baseline's sizes, FLOP counting,
interleaved timing, logging and the environment record.

Importing this module sets the Hugging Face offline switches and puts the repository root on ``sys.path`` (for
``pipelines`` when run from a source checkout), so import it before anything from the HF stack.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipelines` when run from a source checkout

import torch  # noqa: E402
from ldm.flops import count_flops  # noqa: E402,F401  (re-exported for the benches)

T0 = time.perf_counter()
PROMPT = "a photo of a small red fox sitting in the snow, high quality"
NEGATIVE = ""
TEXT_WIDTH, LATENT = 256, 32


def bench_parser(doc: str, sections: tuple[str, ...], quick_help: str):
    """The arguments every bench takes: ``--quick``, ``--only`` (a comma list of ``sections``), ``--threads``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--only", default=",".join(sections), help=f"comma list of: {', '.join(sections)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return ap


def parse_only(ap, args, sections: tuple[str, ...]) -> set[str]:
    """The sections ``--only`` asked for (an argparse error for an unknown one)."""
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only <= set(sections):
        ap.error(f"--only takes {' and/or '.join(sections)}, got {args.only!r}")
    return only


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, file=sys.stderr, flush=True)


def quiet(datasets_too: bool = False) -> None:
    """No warnings or info logs from diffusers/transformers (and datasets): the bench prints its own."""
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    if datasets_too:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------------ components
# Same sizes as the diffusers baseline (bench-diffusers/components.py) unless said otherwise; random weights, seeded,
# offline.
def build_text_encoder(tokenizer, seed: int = 0, width: int = TEXT_WIDTH, layers: int = 4, heads: int = 4):
    """CLIPTextModel: by default width 256, 4 layers, 4 heads (3.4M parameters); SD-1.x's is 768, 12, 12."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()


def build_vae(seed: int = 0, block_out_channels: tuple[int, ...] = (64, 128, 128, 128)):
    """AutoencoderKL, 2 layers per block, 4 latent channels, x8. Default channels (64, 128, 128, 128) (6.9M
    parameters); (128, 256, 512, 512) is Stable Diffusion 1.x's architecture (83.7M)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(block_out_channels), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
    ).eval()


def build_diffusers_unet(seed: int = 0):
    """UNet2DConditionModel in the SD-1.x layout: (128, 256, 384), 2 layers per block, 8 heads, cross-attn 256."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(128, 256, 384),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
        attention_head_dim=8, cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,  # legacy name: 8 *heads*
    ).eval()


def build_pixart(seed: int = 0):
    """PixArtTransformer2DModel: 11 layers x 512 (8 heads x 64), patch 2, ada_norm_single, learned sigma."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=11,
        cross_attention_dim=512, caption_channels=TEXT_WIDTH, sample_size=LATENT, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()


def wake(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random values in the zero-initialised output layers, so the outputs depend on the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def build_ldm_unet(head_dim: int, seed: int = 0, cross_attention_dim: int = TEXT_WIDTH):
    """ldm UNetModel with the diffusers UNet's layout; heads = channels / head_dim per level."""
    from ldm import UNetModel

    torch.manual_seed(seed)
    return wake(UNetModel(
        sample_size=LATENT, in_channels=4, block_out_channels=(128, 256, 384), attention_levels=(True, True, False),
        layers_per_block=2, attention_head_dim=head_dim, cross_attention_dim=cross_attention_dim, norm_num_groups=32,
    ), seed)


def build_ldm_dit(seed: int = 0):
    """ldm DiTModel with PixArt's size: 11 x 512, 8 heads, patch 2, adaLN-single, learned sigma."""
    from ldm import DiTModel

    torch.manual_seed(seed)
    return wake(DiTModel(
        sample_size=LATENT, in_channels=4, learned_sigma=True, patch_size=2, hidden_size=512, depth=11,
        num_attention_heads=8, mlp_ratio=4.0, cross_attention_dim=TEXT_WIDTH, adaln="single",
    ), seed)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------ measuring
def interleaved(fns: dict, warmup: int, reps: int, no_grad: bool = True,
                after_round=None) -> dict[str, list[float]]:
    """Run every fn ``warmup`` times, then ``reps`` rounds of A, B, C, ... ; seconds per call, per name.

    ``after_round(r)`` (optional) is called after each round, outside the timed calls (progress logging).
    """
    times = {k: [] for k in fns}
    with torch.set_grad_enabled(not no_grad):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for r in range(reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            if after_round is not None:
                after_round(r)
    return times


def med(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------ report
def env_record(threads: int) -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": threads, "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "dtype": "float32",
            "loadavg_start": round(os.getloadavg()[0], 2), "argv": sys.argv[1:]}


def footer_lines(res: dict, steadier: str = "the min-based ratio r(min)") -> list[str]:
    """The targets line (when ``res["targets"]`` is set) and the load-average lines."""
    lines = []
    if res.get("targets"):
        lines += ["", "targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in res["targets"].items())]
    return lines + load_lines(res["env"], steadier)


def load_lines(env: dict, steadier: str) -> list[str]:
    """The load-average line, and a warning when other processes competed for the cores."""
    lines = [f"load average before / after: {env['loadavg_start']} / {env['loadavg_end']} on "
             f"{env['cpu_count']} CPUs"]
    if max(env["loadavg_start"], env["loadavg_end"]) > env["threads"] + 0.5:
        lines.append("WARNING: other processes competed for the cores during this run; medians are inflated by "
                     f"them, {steadier} is the steadier figure.")
    return lines
