"""What the bundled-model recipes (``training/make_shapes_model.py``, ``training/make_emoji_model.py``) share: running
a stage's script and the flags every recipe takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "training"


def run(script: str, *args) -> None:
    """Run ``training/<script>`` (or ``python -m <module>`` for a name without ``.py``), echoing the command."""
    cmd = [sys.executable, *([str(TRAINING / script)] if script.endswith(".py") else ["-m", script]), *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def add_recipe_arguments(parser, mixed_precision: str) -> None:
    """The flags every recipe ends with: the shipped guidance, the evaluation size, precision and seed."""
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="the bundled models' default guidance")
    parser.add_argument("--eval_prompts", type=int, default=96, help="prompts per evaluation set")
    parser.add_argument("--mixed_precision", default=mixed_precision, help="no, bf16 or fp16 for every stage")
    parser.add_argument("--seed", type=int, default=0)


def ship_pipeline(source: Path, target: Path, trailing_ddim: bool, half=("denoiser", "vae")) -> None:
    """Copy the pipeline trained in ``source`` to ``target`` with the components ``half`` in float16 storage
    (``LatentPipeline.from_pretrained`` loads them back as float32), with its validation grid and card. A teacher
    (``trailing_ddim``) samples with trailing DDIM, which its zero-terminal-SNR schedule needs; a student keeps its
    distilled scheduler."""
    import shutil

    import torch
    from diffusers import DDIMScheduler

    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(source)
    if trailing_ddim:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   rescale_betas_zero_snr=True)
    shutil.rmtree(target, ignore_errors=True)
    for name in half:
        torch.nn.Module.to(getattr(pipe, name), torch.float16)
    pipe.save_pretrained(target)
    if (source / "validation.png").is_file():
        shutil.copy(source / "validation.png", target / "validation.png")
    ship_card(source, target)


def ship_card(source: Path, target: Path) -> None:
    """Copy the card of the folder a model was trained in, titled and loaded by its shipped name instead."""
    import re

    card = (source / "README.md").read_text()
    for name in (str(source), source.name):
        card = card.replace(f'from_pretrained("{name}")', f'from_pretrained("{target}")')
    card = re.sub(r"^# .*$", f"# {target.name}", card, count=1, flags=re.MULTILINE)
    (target / "README.md").write_text(card)
