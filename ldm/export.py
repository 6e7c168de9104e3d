"""A saved pipeline in diffusers' remote-code layout, for users who never install this project.

    ldm export --portable models/emoji models/emoji-portable
    DiffusionPipeline.from_pretrained("models/emoji-portable", trust_remote_code=True)   # torch + diffusers only

``save_pretrained`` names ldm's classes by module (``["ldm.models.unet", "UNetModel"]``), which diffusers resolves
only when ``ldm`` is installed and imported. The portable copy adds the code next to the weights as diffusers'
custom-component loader expects it: ``pipeline_latent.py`` (+ the ``guidance.py`` / ``latents.py`` it uses) at the
root, ``denoiser/ldm_unet.py`` or ``denoiser/ldm_dit.py`` (+ ``common.py``, ``guidance.py``), and for distilled
students ``scheduler/ldm_progressive_distillation.py`` (+ ``losses.py``, ``noise_schedules.py``); ``model_index.json``
points at them (``["pipeline_latent", "LatentPipeline"]``, ``["ldm_unet", "UNetModel"]``, ...; the ``ldm_`` prefix
keeps clear of diffusers' own module names such as ``dit``, which diffusers would resolve first). Imports between the
copied files become same-folder relative imports, the only kind diffusers copies along. Loading it runs that code,
which is why diffusers asks for ``trust_remote_code=True``: use it for a model whose source you trust, and
``LatentPipeline.from_pretrained`` (no code from the folder runs) when ldm is installed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: module of a saved component -> (file name in the export, the project files it needs, in the same folder)
MODULES = {
    "ldm.models.unet": ("ldm_unet", ["ldm/models/unet.py", "ldm/models/common.py", "ldm/guidance.py"]),
    "ldm.models.dit": ("ldm_dit", ["ldm/models/dit.py", "ldm/models/common.py", "ldm/guidance.py"]),
    "ldm.schedulers.progressive_distillation": (
        "ldm_progressive_distillation",
        ["ldm/schedulers/progressive_distillation.py", "ldm/losses.py", "ldm/noise_schedules.py"]),
}
PIPELINE_FILES = ["pipelines/pipeline_latent.py", "pipelines/folder_checks.py", "ldm/guidance.py", "ldm/latents.py"]


def portable_source(text: str) -> str:
    """A project module's source with its project imports made same-folder relative (``from ..guidance`` and
    ``from ldm.guidance`` -> ``from .guidance``) and the bare ``import ldm`` dropped."""
    text = re.sub(r"^(\s*)from \.\.?(?:[a-z_]+\.)*([a-z_]+) import", r"\1from .\2 import", text, flags=re.MULTILINE)
    text = re.sub(r"^(\s*)from ldm\.(?:[a-z_]+\.)*([a-z_]+) import", r"\1from .\2 import", text, flags=re.MULTILINE)
    return re.sub(r"^import ldm\b.*\n", "", text, flags=re.MULTILINE)


def _copy_code(files: list[str], folder: Path, main_name: str) -> None:
    for i, file in enumerate(files):
        name = f"{main_name}.py" if i == 0 else Path(file).name
        (folder / name).write_text(portable_source((ROOT / file).read_text()))


def export_portable(source: str | Path, target: str | Path) -> Path:
    """Copy the saved pipeline folder ``source`` to ``target`` in the remote-code layout (module docstring)."""
    source, target = Path(source), Path(target)
    index_file = source / "model_index.json"
    if not index_file.is_file():
        raise OSError(f"{source} is not a saved pipeline folder (no model_index.json); pass the folder "
                      "LatentPipeline.save_pretrained wrote.")
    if target.resolve() == source.resolve():
        raise ValueError("Export to a new folder: the portable copy must not overwrite the original.")
    shutil.rmtree(target, ignore_errors=True)
    skip = shutil.ignore_patterns("checkpoint-*", ".tmp-*", "cache", "logs", ".lock")
    shutil.copytree(source, target, ignore=skip)
    index = json.loads(index_file.read_text())
    index["_class_name"] = ["pipeline_latent", "LatentPipeline"]
    _copy_code(PIPELINE_FILES, target, "pipeline_latent")
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in MODULES:
            module, files = MODULES[entry[0]]
            _copy_code(files, target / name, module)
            index[name] = [module, entry[1]]
        elif isinstance(entry, list) and len(entry) == 2 and str(entry[0]).startswith("ldm"):
            raise ValueError(f"{source}: component {name!r} is {entry}, which the portable export does not know.")
    (target / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return target
