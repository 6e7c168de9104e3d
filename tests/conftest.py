"""Shared fixtures: tiny seeded pipelines built once per session, a saved pipeline folder, small helpers.

Everything runs offline on CPU: the tiny components are randomly initialised from configs (``ldm.tiny``).
Images are 32 px (4 x 4 latents) and sampling uses 2-3 steps unless a test needs more.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm.tiny import tiny_pipeline
from pipelines import LatentPipeline

PROMPT = "a red fox"
SIZE = 32  # pixels; tiny VAE factor 8 -> 4 x 4 latents (a multiple of both tiny denoisers' divisor 2)
STEPS = 2


def gen(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator("cpu").manual_seed(seed)


def sample(pipe: LatentPipeline, prompt=PROMPT, seed: int = 0, **kwargs):
    """Run ``pipe`` with the test defaults (32 px, 2 steps, seed 0, numpy output) and return ``.images``."""
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("output_type", "np")
    if "generator" not in kwargs:
        kwargs["generator"] = gen(seed)
    return pipe(prompt, **kwargs).images


def with_components(pipe: LatentPipeline, **replace) -> LatentPipeline:
    """A new ``LatentPipeline`` sharing ``pipe``'s modules, with some components replaced (e.g. the scheduler)."""
    new = LatentPipeline(**{**pipe.components, **replace})
    new.set_progress_bar_config(disable=True)
    return new


def load_script(path, name: str):
    """A script of ``training/`` as a module (registered in ``sys.modules``: its dataclasses look it up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class RunsCode:
    """A pickle payload: unpickling it calls ``os.system(command)`` (for tests that nothing is unpickled)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: no ``PYTHONPATH`` (only the installed ``ldm``/``pipelines`` packages can be
    imported when the working directory is elsewhere), offline Hub, one intra-op thread."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def run_python(code: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the venv's python) with ``cwd`` as working directory."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_different(a, b, min_diff: float = 1e-4) -> None:
    """``a`` and ``b`` (arrays or tensors) differ somewhere by more than ``min_diff``."""
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()
    assert diff > min_diff, f"outputs should differ but max |a - b| = {diff:g}"


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread, restored afterwards (``pytestmark = usefixtures(...)``).

    The tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting for a
    descheduled sibling make every op ~100x slower. One thread also matches the subprocesses (``OMP_NUM_THREADS=1``).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=["unet", "dit"])
def pipe(request) -> LatentPipeline:
    """The tiny U-Net pipeline and the tiny DiT pipeline (DDIM scheduler). Tests must not modify it in place."""
    return tiny_pipeline(request.param)


@pytest.fixture(scope="session")
def unet_pipe() -> LatentPipeline:
    return tiny_pipeline("unet")


@pytest.fixture(scope="session")
def saved_pipes(tmp_path_factory) -> dict[str, str]:
    """``{"unet": folder, "dit": folder}``: the tiny pipelines written with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for kind in ("unet", "dit"):
        folders[kind] = str(root / kind)
        tiny_pipeline(kind).save_pretrained(folders[kind])
    return folders
