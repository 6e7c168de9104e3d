"""``ldm generate`` run as a real command in subprocesses (started together, since each spends seconds importing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from conftest import gen, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")

LDM = str(Path(sys.executable).with_name("ldm"))  # the console-script entry point next to the venv's python
MODULE = [sys.executable, "-m", "ldm.cli"]


@pytest.fixture(scope="module")
def cli(saved_pipes, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run every CLI case at once; ``{case: (completed process, output png)}``."""
    out = tmp_path_factory.mktemp("cli")
    cases = {
        "tiny": [LDM, "generate", "--tiny", "unet", "a red fox", "--steps", "2"],
        "grid": MODULE + ["generate", "--tiny", "dit", "a red fox", "a blue square", "--num_images", "2",
                          "--steps", "2", "--height", "32", "--width", "32"],
        "model": MODULE + ["generate", "--model", saved_pipes["unet"], "a red fox", "--steps", "2",
                           "--height", "32", "--width", "32", "--seed", "3", "--guidance_scale", "5"],
        "missing": MODULE + ["generate", "--model", str(out / "no-such-model"), "a red fox"],
        "typo": MODULE + ["generate", "--model", saved_pipes["unet"] + "x", "a red fox"],
        "cuda": MODULE + ["generate", "--tiny", "unet", "a red fox", "--device", "cuda"],
        "foo": MODULE + ["generate", "--tiny", "unet", "a red fox", "--device", "foo"],
        "xformers": MODULE + ["generate", "--tiny", "unet", "a red fox", "--steps", "1", "--xformers"],
        "files": MODULE + ["generate", "--tiny", "unet", "a red fox", "a cat", "--num_images", "2", "--steps", "1",
                           "--output_dir", str(out / "files"), "--threads", "1"],
        "version": MODULE + ["--version"],
    }
    env = subprocess_env()
    procs = {}
    for name, cmd in cases.items():
        png = out / f"{name}.png"
        procs[name] = (subprocess.Popen(cmd + ["-o", str(png)], cwd=out, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), png, cmd)
    results = {}
    for name, (proc, png, cmd) in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[name] = (subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), png)
    return results


def check_ok(result: subprocess.CompletedProcess, png: Path) -> PIL.Image.Image:
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {png}" in result.stdout
    image = PIL.Image.open(png)
    assert image.format == "PNG" and image.mode == "RGB"
    return image


def test_entry_point_tiny_unet(cli):
    image = check_ok(*cli["tiny"])
    assert image.size == (64, 64)  # tiny U-Net: 8 x 8 latents x VAE factor 8
    assert np.asarray(image).std() > 1.0  # not a blank image


def test_two_prompts_two_images_make_a_2x2_grid(cli):
    result, png = cli["grid"]
    image = check_ok(result, png)
    assert "4 image(s)" in result.stdout
    assert image.size == (64, 64)  # 2 rows (prompts) x 2 columns (images) of 32 px
    tiles = np.asarray(image).reshape(2, 32, 2, 32, 3).transpose(0, 2, 1, 3, 4).reshape(4, 32, 32, 3)
    assert len({tile.tobytes() for tile in tiles}) == 4  # four different images


def test_model_folder(cli, saved_pipes):
    image = check_ok(*cli["model"])
    assert image.size == (32, 32)
    # the same image as the library call with the CLI's settings (CPU generator seeded with --seed, DDIM eta 0)
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(saved_pipes["unet"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red fox", num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                    generator=gen(3)).images[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_bad_model_path_one_line_error(cli):
    result, png = cli["missing"]
    assert result.returncode != 0
    assert not png.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ldm: error:") and "no-such-model" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case, message", [
    ("typo", "does not exist. Did you mean"),
    ("cuda", "this machine has no cuda device; use --device cpu"),
    ("foo", "--device 'foo' is not a device name"),
    ("xformers", "--xformers needs the xformers package"),
])
def test_frictions_are_one_line_errors(cli, case, message):
    result, _ = cli[case]
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_individual_images_and_version(cli):
    result, png = cli["files"]
    check_ok(result, png)
    folder = png.parent / "files"
    assert sorted(p.name for p in folder.iterdir()) == ["00-00.png", "00-01.png", "01-00.png", "01-01.png"]
    version, _ = cli["version"]
    assert version.returncode == 0 and version.stdout.startswith("ldm ")


def test_default_threads_leave_busy_cores_alone():
    import os
    import subprocess
    import sys
    import time

    from ldm.cli import busy_cpus, default_threads

    cpus = len(os.sched_getaffinity(0))
    assert default_threads(busy=0.0) == cpus
    assert default_threads(busy=cpus - 1.0) == 1
    assert default_threads(busy=cpus + 5.0) == 1
    # measured, not averaged: a process spinning on one core shows up as (at least most of) one busy CPU
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cpus(0.5) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
