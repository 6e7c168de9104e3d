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
