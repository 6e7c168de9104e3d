"""``ldm export --portable``: diffusers' remote-code layout, loaded by ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)`` in a fresh virtual environment that has torch, diffusers and transformers (and what they
depend on) but not this project, accelerate, peft or datasets. Plus the guard against another package named ``ldm``."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from ldm.export import export_portable
from ldm.tiny import tiny_pipeline
from pipelines import LatentPipeline

from conftest import sample, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


def dependency_closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need (their non-extra requirements, recursively)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A new venv whose site-packages links exactly the files of torch, diffusers, transformers and their
    dependencies (taken from this environment: nothing is downloaded)."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    wanted = dependency_closure(["torch", "diffusers", "transformers"])
    assert not wanted & {"ldm", "accelerate", "peft", "datasets"}
    tops = set()
    for name in wanted:
        for file in md.distribution(name).files or []:
            top = Path(file).parts[0]
            if top not in ("..", "__pycache__") and (here / top).exists():
                tops.add(top)
    for top in tops:
        (site / top).symlink_to(here / top)
    return str(python)


def run_bare(python: str, code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k not in ("PYTHONPATH",)}
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind, scheduler", [("unet", "ddim"), ("dit", "distilled")])
def test_portable_export_loads_with_diffusers_alone(bare_python, tmp_path, kind, scheduler):
    from ldm import ProgressiveDistillationScheduler

    pipe = tiny_pipeline(kind)
    if scheduler == "distilled":
        pipe.scheduler = ProgressiveDistillationScheduler(num_distilled_steps=4)
    pipe.save_pretrained(tmp_path / "saved")
    export_portable(tmp_path / "saved", tmp_path / "portable")
    index = json.loads((tmp_path / "portable" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent", "LatentPipeline"]
    assert index["denoiser"][0] == f"ldm_{kind}" and (tmp_path / "portable" / "denoiser" / f"ldm_{kind}.py").is_file()
    expected = sample(LatentPipeline.from_pretrained(tmp_path / "saved"), num_inference_steps=4)
    np.save(tmp_path / "expected.npy", expected)
    code = f"""
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
for name in ("ldm", "pipelines", "accelerate", "peft", "datasets"):
    try:
        __import__(name)
        sys.exit(f"{{name}} is importable in the bare venv")
    except ImportError:
        pass
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'portable')!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red fox", num_inference_steps=4, height=32, width=32, generator=torch.Generator().manual_seed(0),
           output_type="np").images
assert type(pipe).__name__ == "LatentPipeline", type(pipe)
np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-5)
print("ok", type(pipe.denoiser).__name__, type(pipe.scheduler).__name__)
"""
    result = run_bare(bare_python, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_without_trust_remote_code_nothing_runs(bare_python, tmp_path):
    tiny_pipeline("unet").save_pretrained(tmp_path / "saved")
    export_portable(tmp_path / "saved", tmp_path / "portable")
    marker = tmp_path / "ran"
    with open(tmp_path / "portable" / "pipeline_latent.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    code = f"""
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(tmp_path / 'portable')!r})
except Exception as err:
    print("refused:", type(err).__name__)
"""
    result = run_bare(bare_python, code, tmp_path)
    assert "refused" in result.stdout, result.stdout + result.stderr[-2000:]
    assert not marker.exists()


def test_another_package_named_ldm_is_named_as_the_conflict(tmp_path):
    fake = tmp_path / "ldm"
    fake.mkdir()
    (fake / "__init__.py").write_text("# CompVis latent-diffusion's ldm package\n")
    env = {**subprocess_env(), "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "from pipelines import LatentPipeline"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "is not this project's ldm" in result.stderr and str(fake) in result.stderr
