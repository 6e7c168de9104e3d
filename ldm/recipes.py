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
    from .distributed import resolve_mixed_precision

    parser.add_argument("--guidance_scale", type=float, default=4.0, help="the bundled models' default guidance")
    parser.add_argument("--eval_prompts", type=int, default=96, help="prompts per evaluation set")
    # "auto" is resolved as it is parsed (argparse converts a string default too), so args hold no, bf16 or fp16
    parser.add_argument("--mixed_precision", default=mixed_precision, type=resolve_mixed_precision,
                        choices=["no", "bf16", "fp16"], metavar="{auto,no,bf16,fp16}",
                        help="for every stage; auto: bf16 on a GPU or a CPU with native bf16 (AVX512-BF16, AMX), "
                             "else no (an AVX2 CPU emulates bf16, about 10x slower than float32)")
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


WRITER_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_diffusers_version")


def _same_file(a: Path, b: Path) -> bool:
    """Byte-identical, or (a config) equal but for the path it was loaded from and the library version that wrote
    it (the same weights saved by transformers 5.24 and 5.25 are the same component)."""
    import filecmp
    import json

    if a.suffix == ".json":
        x, y = json.loads(a.read_text()), json.loads(b.read_text())
        if isinstance(x, dict) and isinstance(y, dict):
            x, y = ({k: v for k, v in d.items() if k not in WRITER_KEYS} for d in (x, y))
        return x == y
    return filecmp.cmp(a, b, shallow=False)


def share_components(target: Path, reference: Path) -> list[str]:
    """Replace each component folder of the pipeline in ``target`` whose files are identical to the same folder of
    ``reference`` (configs but for their ``_name_or_path``; a student's VAE and text encoder are its teacher's) by a
    relative symlink to it, so a bundle stores them once; ``from_pretrained`` follows the link. Returns the shared
    components' names."""
    import shutil

    if target.resolve().parent != reference.resolve().parent:
        raise ValueError(f"share_components links {target} to {reference} by a relative path: both must be in the "
                         "same folder (e.g. models/emoji-student and models/emoji)")
    shared = []
    for folder in sorted(p for p in target.iterdir() if p.is_dir() and not p.is_symlink()):
        other = reference / folder.name
        if not other.is_dir():
            continue
        files = sorted(f.relative_to(folder) for f in folder.rglob("*") if f.is_file())
        if files != sorted(f.relative_to(other) for f in other.rglob("*") if f.is_file()):
            continue
        if all(_same_file(folder / f, other / f) for f in files):
            shutil.rmtree(folder)
            folder.symlink_to(Path("..") / reference.name / folder.name, target_is_directory=True)
            shared.append(folder.name)
    return shared


def ship_card(source: Path, target: Path) -> None:
    """Copy the card of the folder a model was trained in, titled and loaded by its shipped name instead."""
    import re

    card = (source / "README.md").read_text()
    for name in (str(source), source.name):
        card = card.replace(f'from_pretrained("{name}")', f'from_pretrained("{target}")')
    card = re.sub(r"^# .*$", f"# {target.name}", card, count=1, flags=re.MULTILINE)
    (target / "README.md").write_text(card)
