"""``training/train_t2i.py`` end to end on a tiny imagefolder the tests write (issue #3).

Training runs in-process: the script is imported once from its path and each run calls ``main(parse_args([...]))``
with 32 px images, tiny denoiser configs and 2-4 steps. Only the SIGKILL and multi-process tests start subprocesses.
Several flags share one run to stay within the time budget; every run's output is loaded and sampled.

The imagefolder has 12 rows: one with an empty caption and one truncated PNG, so 10 usable rows.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from ldm.checkpointing import list_checkpoints
from ldm.tiny import tiny_pipeline
from pipelines import LatentPipeline

from conftest import RunsCode, assert_different, load_script, sample, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_t2i.py"
NUM_ROWS, EMPTY_CAPTION_ROW, CORRUPT_ROW = 12, 3, 10
SKIPPED = {"no_caption": 1, "bad_image": 1}
DENOISER_CONFIGS = {
    "unet": {"_class_name": "UNetModel", "block_out_channels": [16, 32], "attention_levels": [False, True],
             "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8},
    "dit": {"_class_name": "DiTModel", "patch_size": 2, "hidden_size": 32, "depth": 1, "num_attention_heads": 2},
}
WEIGHTS = Path("denoiser") / "diffusion_pytorch_model.safetensors"
# 10 rows, batch 2, accumulation 2: steps 1-2 take two batches each, step 3 the epoch's last one, step 4 opens epoch 1
RESUME_FLAGS = ["--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--random_flip", "--use_ema",
                "--ema_decay", "0.9", "--caption_dropout", "0.3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
                "--learning_rate", "1e-3", "--checkpointing_steps", "1"]


# ---------------------------------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    root: Path
    data: Path
    base: Path  # a saved tiny pipeline: vae/, text_encoder/, tokenizer/ for the script
    hf_cache: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory, single_thread) -> Env:
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(NUM_ROWS):
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
            png = buffer.getvalue()
            (data / f"{i:02d}.png").write_bytes(png[: len(png) // 2] if i == CORRUPT_ROW else png)
            caption = "" if i == EMPTY_CAPTION_ROW else f"a {colours[i % 4]} square, number {i}"
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": caption}) + "\n")
    for kind, config in DENOISER_CONFIGS.items():
        (root / f"{kind}.json").write_text(json.dumps(config))
    tiny_pipeline("unet").save_pretrained(root / "base")
    return Env(root, data, root / "base", root / "hf-cache")


@pytest.fixture(scope="module")
def t2i():
    """The training script as a module (imported once; its heavy imports are paid once)."""
    return load_script(SCRIPT, "train_t2i")


# ---------------------------------------------------------------------------------------------------- helpers
@dataclass
class Run:
    out: Path
    logs: list[str]

    def log(self, pattern: str) -> re.Match:
        """The first log message matching ``pattern``."""
        for message in self.logs:
            match = re.search(pattern, message)
            if match:
                return match
        raise AssertionError(f"no log message matches {pattern!r}; messages:\n" + "\n".join(self.logs))

    def weights(self) -> dict[str, torch.Tensor]:
        """The saved pipeline's denoiser weights (EMA weights when trained with EMA)."""
        return load_file(self.out / WEIGHTS)

    def checkpoint_weights(self, step: int) -> dict[str, torch.Tensor]:
        """The raw (non-EMA) weights in ``checkpoint-<step>``."""
        return load_file(self.out / f"checkpoint-{step}" / "model.safetensors")

    def state(self, step: int) -> dict:
        """``training_state.json`` of a checkpoint without its file manifest (sizes and hashes)."""
        state = json.loads((self.out / f"checkpoint-{step}" / "training_state.json").read_text())
        files = state.pop("files")
        assert "model.safetensors" in files and all(len(sha) == 64 for _, sha in files.values())
        return state


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def flags_for(env: Env, out: Path, denoiser: str | None, report_to: str | None = "none") -> list[str]:
    """The flags every run shares: base components, the imagefolder, 32 px, batch 2, the tiny ``denoiser``."""
    flags = ["--pretrained_model_name_or_path", str(env.base), "--train_data_dir", str(env.data), "--resolution", "32",
             "--train_batch_size", "2", "--output_dir", str(out), "--cache_dir", str(env.hf_cache)]
    if denoiser is not None:
        flags += ["--denoiser", denoiser, "--denoiser_config", str(env.root / f"{denoiser}.json")]
    if report_to is not None:
        flags += ["--report_to", report_to]
    return flags


def without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    argv = list(argv)
    for flag in flags:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


def train(t2i, env: Env, name: str, *flags: str, denoiser: str | None = "unet", report_to: str | None = "none",
          drop: tuple[str, ...] = ()) -> Run:
    """Run the script in-process into ``<root>/<name>`` (``flags`` override the shared ones, ``drop`` removes some);
    returns its log messages."""
    import diffusers
    import transformers
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a fresh "process" for accelerate
    GradientState._reset_state()
    out = env.root / name
    handler = _Messages()
    loggers = [logging.getLogger(n) for n in ("train_t2i", "ldm")]
    levels = [logger.level for logger in loggers]
    verbosity = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        t2i.main(t2i.parse_args(without(flags_for(env, out, denoiser, report_to), *drop) + list(flags)))
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        diffusers.utils.logging.set_verbosity(verbosity[0])  # the script quietens both libraries
        transformers.utils.logging.set_verbosity(verbosity[1])
    return Run(out, handler.messages)


def load_and_sample(folder: Path) -> tuple[LatentPipeline, np.ndarray]:
    """Load a saved pipeline and draw one 32 px image (finite, right shape)."""
    pipe = LatentPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    return pipe, images


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def card_of(folder: Path) -> tuple[dict, str]:
    """(YAML header as a dict, text) of ``folder/README.md``."""
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def script_command(env: Env, out: Path, *flags: str) -> list[str]:
    """The script as a command (U-Net); subprocesses get their own ``datasets`` cache, the in-process runs may be
    writing theirs."""
    return [sys.executable, str(SCRIPT), *flags_for(env, out, "unet"), "--cache_dir", str(env.hf_cache) + "-sub",
            *flags]


def run_script(cmd: list[str], cwd: Path, timeout: float = 240, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**subprocess_env(), **env_extra}, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def unet_epoch(t2i, env) -> Run:
    """One epoch of U-Net training: epsilon, min-SNR, noise offset, batch 4 (10 rows -> 3 steps). The high learning
    rate wakes the zero-initialised output layers, so the LoRA test's adapters visibly change the images."""
    return train(t2i, env, "unet-epoch", "--num_train_epochs", "1", "--train_batch_size", "4", "--snr_gamma", "5",
                 "--noise_offset", "0.1", "--learning_rate", "1e-2")


@pytest.fixture(scope="module")
def dit_epoch(t2i, env) -> Run:
    """One epoch of DiT training: v-prediction on a zero-terminal-SNR schedule, min-SNR, input perturbation, EMA,
    accumulation 2 (3 batches of 4 -> 2 steps)."""
    return train(t2i, env, "dit-epoch", "--num_train_epochs", "1", "--train_batch_size", "4", "--prediction_type",
                 "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", "5", "--input_perturbation", "0.1",
                 "--use_ema",
                 "--gradient_accumulation_steps", "2", denoiser="dit")


@pytest.fixture(scope="module")
def resume_a(t2i, env) -> Run:
    """The uninterrupted reference run of the resume and SIGKILL tests."""
    return train(t2i, env, "resume-a", *RESUME_FLAGS)


# ---------------------------------------------------------------------------------------------------- 1. one epoch
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_one_epoch_saves_a_loadable_pipeline_with_card(kind, request):
    run: Run = request.getfixturevalue(f"{kind}_epoch")
    steps = 3 if kind == "unet" else 2
    run.log(rf"Training {'UNetModel' if kind == 'unet' else 'DiTModel'} \(\d+ of \d+ parameters trainable\) for "
            rf"{steps} steps")
    assert [p.name for p in list_checkpoints(run.out)] == [f"checkpoint-{steps}"]
    state = run.state(steps)
    ema = state.pop("ema", None)  # the EMA's scalars (its weights are ema.safetensors beside)
    assert state == {"epoch": 0, "batches_in_epoch": 3, "skipped": SKIPPED, "step": steps}
    assert (ema is not None) == (kind == "dit") and (ema is None or ema["optimization_step"] == steps)
    assert (run.out / f"checkpoint-{steps}" / "ema.safetensors").is_file() == (kind == "dit")
    assert not list(run.out.rglob("*.pkl")) or all("random_states" in p.name for p in run.out.rglob("*.pkl"))

    pipe, images = load_and_sample(run.out)
    assert type(pipe.denoiser).__name__ == ("UNetModel" if kind == "unet" else "DiTModel")
    assert pipe.denoiser.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    if kind == "unet":
        assert list(pipe.denoiser.config.block_out_channels) == DENOISER_CONFIGS["unet"]["block_out_channels"]
    else:
        assert pipe.denoiser.config.hidden_size == DENOISER_CONFIGS["dit"]["hidden_size"]
    _, base_images = load_and_sample(run.out.parent / "base")
    assert_different(images, base_images)  # the new denoiser, not the base pipeline's

    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert config.beta_schedule == "linear" and config.num_train_timesteps == 1000
    assert config.beta_start == pytest.approx(1e-4) and config.beta_end == pytest.approx(0.02)
    if kind == "unet":
        assert config.prediction_type == "epsilon" and not config.rescale_betas_zero_snr
    else:
        assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
        assert config.timestep_spacing == "trailing"  # zero-terminal SNR: sampling starts at the last timestep

    header, text = card_of(run.out)
    assert header["library_name"] == "ldm" and header["pipeline_tag"] == "text-to-image"
    assert header["license"] == "apache-2.0"
    assert {"text-to-image", "diffusion", "ldm"} <= set(header["tags"])
    assert "base_model" not in header and "datasets" not in header  # trained from scratch on a local folder
    assert "| hyper-parameter | value |" in text
    for key, value in [("trained_steps", steps), ("learning_rate", 0.01 if kind == "unet" else 0.0001),
                       ("train_batch_size", 4),
                       ("denoiser", kind), ("prediction_type", "epsilon" if kind == "unet" else "v_prediction")]:
        assert f"| `{key}` | `{value}` |" in text
    assert "DDIMScheduler" in text and (kind == "unet") == ("rescaled to zero terminal SNR" not in text)


# ---------------------------------------------------------------------------------------------------- 2. flags
def test_sample_prediction_with_gradient_checkpointing(t2i, env):
    run = train(t2i, env, "sample-pred", "--prediction_type", "sample", "--max_train_steps", "2",
                "--gradient_checkpointing", "--beta_schedule", "scaled_linear", "--beta_start", "0.00085",
                "--beta_end", "0.012")
    pipe, _ = load_and_sample(run.out)
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert config.prediction_type == "sample" and config.beta_schedule == "scaled_linear"
    assert config.beta_end == pytest.approx(0.012)
    assert run.state(2)["step"] == 2


def test_learned_variance_saves_ddpm_with_learned_range(t2i, env):
    run = train(t2i, env, "learned-variance", "--learned_variance", "--max_train_steps", "2", "--snr_gamma", "5",
                denoiser="dit")
    pipe, _ = load_and_sample(run.out)
    assert pipe.denoiser.config.learned_sigma
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    x = torch.zeros(1, 4, 4, 4)
    with torch.no_grad():
        out = pipe.denoiser(x, torch.tensor([10]), torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)).sample
    assert out.shape == (1, 8, 4, 4)  # [prediction, variance]


def test_fixed_large_variance_saves_ddpm_sampling_with_it(t2i, env):
    run = train(t2i, env, "fixed-large", "--variance_type", "fixed_large", "--max_train_steps", "1")
    pipe, _ = load_and_sample(run.out)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.variance_type == "fixed_large"
    assert not pipe.denoiser.config.learned_sigma


def test_flow_matching_trains_and_saves_the_flow_scheduler_it_samples_with(t2i, env):
    from diffusers import FlowMatchHeunDiscreteScheduler

    run = train(t2i, env, "flow", "--prediction_type", "flow", "--timestep_shift", "auto", "--max_train_steps", "3",
                "--learning_rate", "1e-3", "--caption_dropout", "0.5")
    pipe, images = load_and_sample(run.out)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == pytest.approx(32 / 256)  # SD3's rule at --resolution 32
    assert json.loads((run.out / "training_args.json").read_text())["weighting_scheme"] == "logit_normal"
    assert "Trained with flow matching" in card_of(run.out)[1]
    np.testing.assert_array_equal(sample(pipe), images)  # seeded: the same image again
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    assert np.isfinite(sample(pipe)).all()


@pytest.fixture(scope="module")
def held_out(env) -> Path:
    """A held-out imagefolder of 6 rows (other images and captions than the training rows)."""
    folder = env.root / "held-out"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(6):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": [f"held-out {i}", f"another caption {i}"]}) + "\n")
    return folder


def validation_losses(run: Run) -> dict[int, dict]:
    lines = (run.out / "logs" / "validation_loss.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


@pytest.mark.parametrize("objective", [["--prediction_type", "v_prediction"], ["--prediction_type", "flow"]])
def test_validation_loss_is_identical_across_runs_and_across_a_resume(t2i, env, held_out, objective):
    flags = ["--validation_loss_every", "2", "--validation_data_dir", str(held_out), "--validation_loss_samples",
             "5", "--validation_loss_buckets", "2", "--learning_rate", "1e-3", "--checkpointing_steps", "2",
             "--random_flip", *objective]
    name = objective[1]
    first = validation_losses(train(t2i, env, f"val-{name}-a", "--max_train_steps", "4", *flags))
    second = validation_losses(train(t2i, env, f"val-{name}-b", "--max_train_steps", "4", *flags))
    assert first == second and sorted(first) == [2, 4]
    assert first[2]["val_loss"] != first[4]["val_loss"]  # it follows the weights
    assert {k for k in first[4] if k.startswith("val_loss/")} <= {"val_loss/t0.00-0.50", "val_loss/t0.50-1.00"}
    train(t2i, env, f"val-{name}-c", "--max_train_steps", "2", *flags)
    resumed = train(t2i, env, f"val-{name}-c", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *flags)
    assert validation_losses(resumed) == first


def test_validation_loss_needs_held_out_data(t2i, env):
    with pytest.raises(ValueError, match="has no validation/ split folder .* Pass --validation_data_dir"):
        t2i.parse_args(flags_for(env, env.root / "bad", "unet") + ["--validation_loss_every", "2"])


def test_zero_snr_with_epsilon_is_refused(t2i, env):
    with pytest.raises(ValueError, match="rescale_betas_zero_snr.*v_prediction"):
        train(t2i, env, "zero-snr-eps", "--rescale_betas_zero_snr", "--max_train_steps", "1")
    assert not (env.root / "zero-snr-eps" / "model_index.json").exists()


@pytest.fixture(scope="module")
def cache_runs(t2i, env) -> dict[str, Run]:
    """2 steps with random flips and lr 1e-3: latents cached (posterior samples / posterior mean), on the fly, and on
    the fly with another seed."""
    common = ["--max_train_steps", "2", "--random_flip"]
    return {
        "cached": train(t2i, env, "cache-posterior", *common, "--cache_latents", "--cache_latents_mode", "posterior"),
        "fly": train(t2i, env, "cache-none", *common),
        "mean": train(t2i, env, "cache-mean", *common, "--cache_latents", "--cache_latents_mode", "mean",
                      "--latents_cache_dir", str(env.root / "latents-cache")),
        "seed": train(t2i, env, "cache-seed", *common, "--seed", "1"),
    }


def test_cached_latents_train_on_the_same_draws(cache_runs, env):
    cached, fly, mean, seed = (cache_runs[k] for k in ("cached", "fly", "mean", "seed"))
    assert list((cached.out / "cache").glob("latents-*.arrow"))  # the cache was written (default place)
    assert list((env.root / "latents-cache").glob("latents-*.arrow"))  # --latents_cache_dir
    assert not (fly.out / "cache").exists()
    # Same flips, posterior samples, noise, timesteps and dropout. Bitwise equal here; the tolerance allows for VAE
    # kernels whose float summation order depends on the batch size (the cache encodes 16 images at a time).
    assert_weights_equal(cached.weights(), fly.weights(), atol=1e-5)
    assert max_diff(mean.weights(), fly.weights()) > 1e-4  # posterior mean instead of samples: other data
    assert max_diff(seed.weights(), fly.weights()) > 1e-4
    for run in cache_runs.values():
        load_and_sample(run.out)


# ---------------------------------------------------------------------------------------------------- 4. resume
class _Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(t2i, env, resume_a, monkeypatch):
    import ldm.train_loop

    save = ldm.train_loop.save_checkpoint

    def save_then_stop(accelerator, output_dir, step, *args, **kwargs):
        path = save(accelerator, output_dir, step, *args, **kwargs)
        if step == 1:
            raise _Interrupted  # the run dies right after checkpoint-1 (mid-epoch: 2 of 5 batches)
        return path

    monkeypatch.setattr(ldm.train_loop, "save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        train(t2i, env, "resume-b", *RESUME_FLAGS)
    monkeypatch.undo()
    b_out = env.root / "resume-b"
    assert [p.name for p in list_checkpoints(b_out)] == ["checkpoint-1"] and not (b_out / "model_index.json").exists()
    assert json.loads((b_out / "checkpoint-1" / "training_state.json").read_text())["batches_in_epoch"] == 2

    b = train(t2i, env, "resume-b", *RESUME_FLAGS, "--resume_from_checkpoint", "latest")
    b.log(r"Resumed from .*checkpoint-1 at step 1 \(epoch 0, 2 batches in\)")
    assert [p.name for p in list_checkpoints(b.out)] == [f"checkpoint-{s}" for s in (1, 2, 3, 4)]
    for step in (2, 3, 4):
        assert b.state(step) == resume_a.state(step)
        assert_weights_equal(b.checkpoint_weights(step), resume_a.checkpoint_weights(step))
    assert resume_a.state(4)["epoch"] == 1
    assert_weights_equal(b.weights(), resume_a.weights())  # the saved pipeline holds the EMA weights
    assert max_diff(resume_a.weights(), resume_a.checkpoint_weights(4)) > 1e-5  # ... which differ from the raw ones
    lrs = [[torch.load(r.out / f"checkpoint-{s}" / "scheduler.bin", weights_only=True)["_last_lr"][0]
            for s in (2, 3, 4)] for r in (resume_a, b)]
    assert lrs[1] == lrs[0] == pytest.approx([7.5e-4, 2.5e-4, 0.0])  # the cosine schedule went on where it stopped
    load_and_sample(b.out)


# ---------------------------------------------------------------------------------------------------- 5. SIGKILL
def _sigkill_during_save(env: Env) -> dict:
    """Kill the run inside the save of checkpoint-3 (fault injection), look at what is left, resume it."""
    out = env.root / "sigkill-save"
    cmd = script_command(env, out, *RESUME_FLAGS)
    kill_at_3 = ("import os, runpy, signal, sys; import ldm.checkpointing as c; "
                 "c.BEFORE_PUBLISH_HOOKS.append(lambda step, tmp: step == 3 and os.kill(os.getpid(), signal.SIGKILL)); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    killed = run_script([cmd[0], "-c", kill_at_3, *cmd[1:]], env.root)
    left = {"checkpoints": [p.name for p in list_checkpoints(out)],
            "dirs": sorted(p.name for p in out.iterdir() if p.name != ".lock")}
    resumed = run_script(cmd + ["--resume_from_checkpoint", "latest"], env.root)
    return {"out": out, "killed": killed, "left": left, "resumed": resumed}


def _sigkill_at_random(env: Env) -> dict:
    """SIGKILL a 32-step run at a random moment after its first checkpoint, then resume it."""
    out = env.root / "sigkill-random"
    cmd = script_command(env, out, "--max_train_steps", "32", "--checkpointing_steps", "4",
                         "--checkpoints_total_limit", "2")
    proc = subprocess.Popen(cmd, cwd=env.root, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    delay = random.uniform(0.0, 0.3)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate(timeout=60)[1]
    killed = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
    final_written = (out / "model_index.json").exists()
    resumed = run_script(cmd + ["--resume_from_checkpoint", "latest"], env.root)
    return {"out": out, "killed": killed, "delay": delay, "final_written": final_written, "resumed": resumed}


def two_process_launch(script: list[str]) -> list[str]:
    """``script_command``'s script under ``accelerate launch`` with 2 CPU processes (gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *script[1:]]


def _two_processes(env: Env) -> dict:
    out = env.root / "multi-process"
    cmd = two_process_launch(script_command(env, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    return {"out": out, "result": run_script(cmd, env.root, timeout=300)}


def _two_processes_streaming(env: Env) -> dict:
    """Two processes streaming (1) the imagefolder, one file that each process reads whole, keeping its own batches;
    (2) the same rows as two Arrow files of 7 and 5 rows, split by file: 6 steps, then the run resumed from a copy
    of its checkpoint-3. (Arrow, not parquet: datasets sleeps 5 s whenever a shuffled parquet stream ends a pass.)"""
    import datasets
    import pyarrow as pa

    arrow = env.root / "arrow-data"
    arrow.mkdir()
    rows = [json.loads(line) for line in (env.data / "metadata.jsonl").read_text().splitlines()]
    records = [{"image": {"bytes": (env.data / r["file_name"]).read_bytes(), "path": None}, "text": r["text"]}
               for r in rows]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for k, part in enumerate((records[:7], records[7:])):
        table = datasets.Dataset.from_list(part, features=features).data.table
        with pa.OSFile(str(arrow / f"train-{k}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)

    def command(output: Path, *flags: str, by_file: bool = False) -> list[str]:
        script = script_command(env, output, "--streaming", "--max_train_steps", "6", "--checkpointing_steps", "3",
                                *flags)
        if by_file:
            script = without(script, "--train_data_dir") + ["--dataset_name", str(arrow),
                                                              "--gradient_accumulation_steps", "2"]
        return two_process_launch(script)

    one_file = run_script(command(env.root / "stream-one-file"), env.root, timeout=300)
    split, resumed = env.root / "stream-split", env.root / "stream-split-resumed"
    full = run_script(command(split, by_file=True), env.root, timeout=300)
    if full.returncode == 0:
        resumed.mkdir()
        shutil.copytree(split / "checkpoint-3", resumed / "checkpoint-3")
    again = run_script(command(resumed, "--resume_from_checkpoint", "latest", by_file=True), env.root, timeout=300)
    return {"one_file": one_file, "full": full, "resumed": again}


SCENARIOS = {"test_sigkill_during_save_then_resume_latest": _sigkill_during_save,
             "test_sigkill_at_a_random_moment_then_resume": _sigkill_at_random,
             "test_two_process_training_with_gloo": _two_processes,
             "test_two_process_streaming_counts_bad_rows_once_and_resumes_exactly": _two_processes_streaming}


@pytest.fixture(scope="module", autouse=True)
def scenarios(request, env):
    """The subprocess scenarios of the selected tests, started with the module in two background threads: they run
    while the in-process tests (one thread) train."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(fn, env) for name, fn in SCENARIOS.items() if name in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_sigkill_during_save_then_resume_latest(scenarios, resume_a):
    run = scenarios["test_sigkill_during_save_then_resume_latest"].result()
    out, killed, left, resumed = run["out"], run["killed"], run["left"], run["resumed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert left["checkpoints"] == ["checkpoint-1", "checkpoint-2"]  # the previous complete checkpoint survives
    assert "checkpoint-3" not in left["dirs"] and ".tmp-checkpoint-3" in left["dirs"]

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"Removing .*\.tmp-checkpoint-3, left by a save that did not finish", resumed.stderr)
    assert re.search(r"Resumed from .*checkpoint-2 at step 2 \(epoch 0, 4 batches in\)", resumed.stderr)
    assert not (out / ".tmp-checkpoint-3").exists()
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in (1, 2, 3, 4)]
    for step in (3, 4):
        assert_weights_equal(load_file(out / f"checkpoint-{step}" / "model.safetensors"),
                             resume_a.checkpoint_weights(step))
    assert_weights_equal(load_file(out / WEIGHTS), resume_a.weights())  # EMA weights too
    load_and_sample(out)


def test_sigkill_at_a_random_moment_then_resume(scenarios):
    run = scenarios["test_sigkill_at_a_random_moment_then_resume"].result()
    out, killed, resumed, delay = run["out"], run["killed"], run["resumed"], run["delay"]
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill ({delay=:.3f} s): " \
                                                 f"{killed.stderr[-3000:]}"
    assert not run["final_written"]
    assert resumed.returncode == 0, f"{delay=:.3f} s: {resumed.stderr[-3000:]}"
    assert re.search(r"Resumed from .*checkpoint-\d+ at step \d+", resumed.stderr), resumed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-28", "checkpoint-32"]  # total limit 2
    assert json.loads((out / "checkpoint-32" / "training_state.json").read_text())["step"] == 32
    assert not list(out.glob(".tmp-checkpoint-*"))
    load_and_sample(out)


# ---------------------------------------------------------------------------------------------------- 6. multi-process
def test_two_process_training_with_gloo(scenarios):
    run = scenarios["test_two_process_training_with_gloo"].result()
    out, result = run["out"], run["result"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Weights identical on all 2 processes" in log
    assert re.search(r"for 4 steps, 4 images per step", log), log[-4000:]  # 2 processes x batch 2
    checkpoints = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]  # written once, no leftovers of a second writer
    for name in checkpoints:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files.count("model.safetensors") == 1
        assert {"random_states_0.pkl", "random_states_1.pkl", "training_state.json"} <= set(files)
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["skipped"] == SKIPPED
    load_and_sample(out)


def test_two_process_streaming_counts_bad_rows_once_and_resumes_exactly(scenarios, env):
    run = scenarios["test_two_process_streaming_counts_bad_rows_once_and_resumes_exactly"].result()
    for name in ("one_file", "full", "resumed"):  # the captions travel with each process's own batches
        assert run[name].returncode == 0, (run[name].stdout + run[name].stderr)[-4000:]
        assert "Skipped 2 rows: 1 without a caption, 1 with an undecodable image" in run[name].stderr

    def state(folder: str, step: int) -> dict:  # without the file manifest (pickled RNG states differ by run)
        state = json.loads((env.root / folder / f"checkpoint-{step}" / "training_state.json").read_text())
        state.pop("files")
        return state

    # one file, 10 usable rows in rounds of 2 processes x batch 2: 2 batches each per epoch (the ragged rows dropped)
    assert state("stream-one-file", 3)["positions"] == [[1, 1], [1, 1]]
    assert state("stream-one-file", 6)["positions"] == [[2, 2], [2, 2]]
    # split by file: 6 and 4 usable rows, 3 and 2 batches per epoch, so the processes' epochs drift apart
    assert state("stream-split", 3)["positions"] == [[1, 3], [2, 2]]
    for folder, step in (("stream-one-file", 3), ("stream-one-file", 6), ("stream-split", 6)):
        assert state(folder, step)["skipped"] == SKIPPED  # summed over the processes, each bad row once
    assert re.search(r"Resumed from .*checkpoint-3 at step 3 \(epoch 1, 3 batches in\)", run["resumed"].stderr)
    assert state("stream-split-resumed", 6) == state("stream-split", 6)
    assert_weights_equal(load_file(env.root / "stream-split-resumed" / WEIGHTS),
                         load_file(env.root / "stream-split" / WEIGHTS), atol=0)


# ---------------------------------------------------------------------------------------------------- 7. bad rows
def test_bad_rows_are_skipped_and_counted(unet_epoch):
    unet_epoch.log(r"Skipped 2 rows of 12: 1 without a caption, 1 with an undecodable image")
    unet_epoch.log(r"for 3 steps, 4 images per step")  # 10 usable rows of 12 in batches of 4


def test_streaming_skips_and_counts_bad_rows(t2i, env):
    # 10 steps of 2 rows = two passes over the data: each bad row is counted once
    run = train(t2i, env, "streaming", "--streaming", "--max_train_steps", "10", "--checkpointing_steps", "5",
                denoiser="dit")
    assert run.state(5)["skipped"] == SKIPPED and run.state(5)["epoch"] == 0
    assert run.state(10)["skipped"] == SKIPPED and run.state(10)["epoch"] == 1
    run.log(r"Skipped 2 rows: 1 without a caption, 1 with an undecodable image")
    load_and_sample(run.out)


def test_stream_without_a_usable_row_fails_instead_of_looping(t2i, env):
    data = env.root / "all-bad"
    data.mkdir()
    shutil.copy(env.data / "00.png", data / "00.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "00.png", "text": "  "}) + "\n")
    with pytest.raises(ValueError, match="gave no batch in a whole pass"):
        train(t2i, env, "all-bad", "--streaming", "--train_data_dir", str(data), "--max_train_steps", "2")


# ---------------------------------------------------------------------------------------------------- 8. LoRA
def test_lora_fine_tuning_writes_only_adapters(t2i, env, unet_epoch):
    run = train(t2i, env, "lora", "--pretrained_model_name_or_path", str(unet_epoch.out), "--lora_rank", "4",
                "--learning_rate", "1e-2", "--max_train_steps", "2", denoiser=None)
    written = {p.name for p in run.out.iterdir()} - {"checkpoint-2", "training_args.json", ".lock"}
    assert written == {"pytorch_lora_weights.safetensors", "README.md"}
    adapters = load_file(run.out / "pytorch_lora_weights.safetensors")
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    trainable, total = map(int, run.log(r"\((\d+) of (\d+) parameters trainable\)").groups())
    base_count = sum(v.numel() for v in load_file(unet_epoch.out / WEIGHTS).values())
    assert trainable == sum(v.numel() for v in adapters.values()) and total == base_count + trainable

    header, text = card_of(run.out)
    assert "lora" in header["tags"] and "base_model" not in header  # a local folder is no Hub id
    assert f'from_pretrained("{unet_epoch.out}")' in text and 'load_lora_weights("lora")' in text

    pipe, base_images = load_and_sample(unet_epoch.out)
    pipe.load_lora_weights(str(run.out))
    lora_images = sample(pipe)
    assert np.isfinite(lora_images).all()
    assert_different(lora_images, base_images)


def test_card_names_hub_ids_only(tmp_path):
    from ldm.model_card import render_model_card

    common = dict(hyperparameters={"learning_rate": 1e-4, "hub_token": "hf_x"}, denoiser_class="UNetModel",
                  num_parameters="1M", scheduler_class="DDIMScheduler", prediction_type="epsilon",
                  beta_schedule="linear", example_prompt="a fox")
    render_model_card(tmp_path, repo_id="me/lora", base_model="me/base", datasets="me/data", tags=["lora"],
                      lora=True, lora_rank=4, **common)
    header, text = card_of(tmp_path)
    assert header["base_model"] == "me/base" and header["datasets"] == ["me/data"] and "lora" in header["tags"]
    assert 'from_pretrained("me/base")' in text and 'load_lora_weights("me/lora")' in text
    assert "| `learning_rate` | `0.0001` |" in text and "hf_x" not in text
    render_model_card(tmp_path, repo_id="me/model", base_model=str(tmp_path), datasets=["./data", "me/data"],
                      **common)
    header, text = card_of(tmp_path)
    assert "base_model" not in header and header["datasets"] == ["me/data"]
    assert f"starting from `{tmp_path}`" in text and 'from_pretrained("me/model")' in text


# ---------------------------------------------------------------------------------------------------- 9. push
def test_push_to_hub_up_to_the_network(t2i, env, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = dict(kwargs, repo_id=repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        calls["upload_folder"] = dict(kwargs, files=files)
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    # default --report_to (tensorboard), validation with EMA, the built-in data set (named in the card)
    run = train(t2i, env, "push", "--push_to_hub", "--hub_model_id", "me/tiny", "--hub_token", "hf_SECRET123",
                "--dataset_name", "shapes", "--max_train_samples", "8", "--max_train_steps", "2",
                "--checkpointing_steps", "1", "--use_ema", "--validation_prompts", "a red circle",
                "--validation_steps", "1", "--validation_inference_steps", "2", report_to=None,
                drop=("--train_data_dir",))

    assert calls["create_repo"]["repo_id"] == "me/tiny" and calls["create_repo"]["token"] == "hf_SECRET123"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny" and upload["token"] == "hf_SECRET123"
    assert Path(upload["folder_path"]) == run.out
    uploaded = set(filter_repo_objects(upload["files"], ignore_patterns=upload["ignore_patterns"]))
    assert {"model_index.json", WEIGHTS.as_posix(), "denoiser/config.json", "scheduler/scheduler_config.json",
            "vae/diffusion_pytorch_model.safetensors", "README.md", "validation.png"} <= uploaded
    excluded = set(upload["files"]) - uploaded
    assert any(f.startswith("checkpoint-") for f in excluded) and any(f.startswith("logs/") for f in excluded)
    assert not any(f.startswith(("checkpoint-", "logs/", "validation/", "cache/")) for f in uploaded)

    header, text = card_of(run.out)
    assert header["datasets"] == ["shapes"] and 'from_pretrained("me/tiny")' in text
    assert "![validation grid](validation.png)" in text
    assert sorted(p.name for p in (run.out / "validation").iterdir()) == ["step-1.png", "step-2.png"]
    assert list((run.out / "logs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    assert (env.hf_cache / "generator").is_dir()  # the built-in data set honours --cache_dir
    assert "wandb" not in sys.modules  # tensorboard logging needs no wandb
    for path in run.out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET123" not in path.read_bytes(), f"the token leaked into {path}"
    load_and_sample(run.out)


# ---------------------------------------------------------------------------------------------------- 10. NaN
def test_non_finite_loss_stops_and_keeps_checkpoints(t2i, env):
    out = env.root / "nan"
    with pytest.raises(RuntimeError, match=r"non-finite\) at step 2; .*last good checkpoint is .*checkpoint-1"):
        train(t2i, env, "nan", "--learning_rate", "1e30", "--max_train_steps", "4", "--checkpointing_steps", "1")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    state = json.loads((out / "checkpoint-1" / "training_state.json").read_text())
    assert state["step"] == 1
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model_index.json").exists() and not (out / "README.md").exists()


# ---------------------------------------------------------------------------------------------------- 11. bad args
NO_DENOISER = ("--denoiser", "--denoiser_config")


@pytest.mark.parametrize("drop, flags, message", [
    (("--train_data_dir",), [], "Give --dataset_name or --train_data_dir."),
    ((), ["--streaming"], "--streaming data has no length: give --max_train_steps."),
    ((), ["--streaming", "--max_train_steps", "2", "--cache_latents"], "--cache_latents needs a map-style data set"),
    ((), ["--lora_rank", "4"], "--lora_rank fine-tunes an existing denoiser: drop --denoiser"),
    (NO_DENOISER, ["--lora_rank", "4", "--use_ema"], "--use_ema with --lora_rank is not supported"),
    (NO_DENOISER, ["--lora_rank", "4", "--learned_variance"], "it cannot be trained with LoRA"),
    ((), ["--caption_dropout", "1"], "--caption_dropout must be in [0, 1), got 1.0"),
    ((), ["--input_perturbation", "-0.1"], "--input_perturbation is a noise scale >= 0 (0.1 is usual), got -0.1"),
    ((), ["--prediction_type", "flow", "--snr_gamma", "5"], "--snr_gamma belongs to the DDPM objectives"),
    ((), ["--prediction_type", "flow", "--rescale_betas_zero_snr"], "--rescale_betas_zero_snr belongs to the DDPM"),
    ((), ["--prediction_type", "flow", "--learned_variance"], "--learned_variance / --variance_type belongs to"),
    ((), ["--prediction_type", "flow", "--variance_type", "fixed_large"], "--variance_type belongs to the DDPM"),
    ((), ["--timestep_shift", "3"], "--timestep_shift is for --prediction_type flow"),
    ((), ["--prediction_type", "flow", "--timestep_shift", "big"], "--timestep_shift must be a number or 'auto'"),
    ((), ["--learned_variance", "--variance_type", "fixed_large"],
     "--learned_variance is --variance_type learned_range"),
    (("--pretrained_model_name_or_path",), [], "Give --pretrained_model_name_or_path, or both --vae and"),
    (("--pretrained_model_name_or_path", *NO_DENOISER), ["--vae", "v", "--text_encoder", "t"],
     "Say which denoiser to train from scratch"),
])
def test_bad_arguments_are_refused(t2i, env, drop, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        t2i.parse_args(without(flags_for(env, env.root / "bad", "unet"), *drop) + flags)


@pytest.mark.parametrize("flags, message", [
    (["--resume_from_checkpoint", "{root}"], "is not a complete checkpoint (no training_state.json)"),
    (["--resume_from_checkpoint", "checkpoint-7"], "is not a complete checkpoint (no training_state.json)"),
    (["--resolution", "36"], "--resolution 36 is not a multiple of the VAE factor 8"),
    (["--denoiser_config", "unet-xl"], "Unknown U-Net size 'unet-xl'; choose one of unet-s, unet-b, unet-l"),
])
def test_bad_arguments_fail_in_main(t2i, env, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(t2i, env, "bad-main", *[f.format(root=env.root) for f in flags], "--max_train_steps", "1")
    assert not (env.root / "bad-main" / "model_index.json").exists()


# ---------------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bf16_mixed_precision_trains_both_denoisers_close_to_float32(t2i, env, kind):
    """``--mixed_precision bf16`` on the CPU: the denoiser trains under bf16 autocast with float32 master weights
    (saved in float32), the frozen VAE stays float32 (``--vae_dtype fp32``), the text encoder runs in bf16; the
    weights after 3 steps stay close to the float32 run's."""
    flags = ("--max_train_steps", "3", "--learning_rate", "1e-3", "--checkpointing_steps", "10")
    fp32 = train(t2i, env, f"fp32-{kind}", *flags, "--mixed_precision", "no", denoiser=kind)
    bf16 = train(t2i, env, f"bf16-{kind}", *flags, "--mixed_precision", "bf16", denoiser=kind)
    a, b = fp32.weights(), bf16.weights()
    assert {v.dtype for v in b.values()} == {torch.float32}
    init = train(t2i, env, f"init-{kind}", "--max_train_steps", "1", "--learning_rate", "0", "--mixed_precision",
                 "no", "--checkpointing_steps", "10", denoiser=kind).weights()
    def norm(x, y):
        return sum(float((x[k].double() - y[k].double()).square().sum()) for k in x) ** 0.5

    moved, apart = norm(a, init), norm(a, b)
    assert moved > 1e-3 and apart < 0.5 * moved  # bf16 follows the float32 trajectory
    load_and_sample(bf16.out)


# ---------------------------------------------------------------------------------------------------- frictions
def _ema_run(t2i, env, name: str) -> Run:
    return train(t2i, env, name, "--max_train_steps", "1", "--checkpointing_steps", "1", "--use_ema")


def test_ema_lives_in_safetensors_and_a_mismatched_resume_says_which_flag(t2i, env):
    run = _ema_run(t2i, env, "ema-flag")
    assert (run.out / "checkpoint-1" / "ema.safetensors").is_file()
    assert not (run.out / "checkpoint-1" / "custom_checkpoint_0.pkl").exists()
    with pytest.raises(ValueError, match="holds EMA weights .* pass --use_ema to resume it"):
        train(t2i, env, "ema-flag", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    plain = train(t2i, env, "no-ema", "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(ValueError, match="has no EMA weights .* drop --use_ema"):
        train(t2i, env, plain.out.name, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--use_ema")


@pytest.mark.parametrize("file, refused", [("custom_checkpoint_0.pkl", True), ("optimizer.bin", True),
                                           ("scheduler.bin", True), ("random_states_0.pkl", False)])
def test_no_code_runs_from_a_checkpoint_folder(t2i, env, file, refused):
    """A crafted pickle in a checkpoint (the old pickled EMA, the optimizer, LR-scheduler or RNG state) never runs:
    the first three stop the resume with an error; accelerate skips unreadable RNG states (the run's draws come from
    the per-step generators, so it resumes exactly all the same)."""
    import pickle

    from ldm.checkpointing import manifest

    run = _ema_run(t2i, env, f"crafted-{file}")
    marker = env.root / f"pwned-{file}"
    checkpoint = run.out / "checkpoint-1"
    (checkpoint / file).write_bytes(pickle.dumps({"state": RunsCode(f"touch {marker}")}))
    resume = ("--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--use_ema")
    with pytest.raises(ValueError, match="passes its integrity check|no longer unpickles"):  # noticed
        train(t2i, env, run.out.name, *resume)
    state = json.loads((checkpoint / "training_state.json").read_text())  # an attacker can rewrite it too:
    state["files"] = manifest(checkpoint)                                   # then the loaders must hold
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    if refused:
        with pytest.raises(Exception):
            train(t2i, env, run.out.name, *resume)
    else:
        train(t2i, env, run.out.name, *resume)
    assert not marker.exists()


def test_imagefolder_without_metadata_says_what_is_missing(t2i, env, tmp_path):
    (tmp_path / "0.png").write_bytes((env.data / "00.png").read_bytes())
    with pytest.raises(ValueError, match="has no metadata.jsonl.*file_name"):
        train(t2i, env, "no-metadata", "--train_data_dir", str(tmp_path), "--max_train_steps", "1")


def test_a_tracker_that_is_not_installed_fails_before_training(t2i, env):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ImportError, match="--report_to wandb needs the wandb package"):
        train(t2i, env, "wandb", "--max_train_steps", "1", report_to="wandb")
    assert not (env.root / "wandb" / "checkpoint-1").exists()


def test_resolution_defaults_to_the_vaes_and_unet_sizes_are_named(t2i, env):
    with pytest.raises(ValueError, match="needs a size: --denoiser_config unet-s, unet-b, unet-l"):
        train(t2i, env, "no-size", "--max_train_steps", "1", drop=("--denoiser_config",))
    run = train(t2i, env, "vae-size", "--max_train_steps", "1", "--checkpointing_steps", "1", drop=("--resolution",))
    vae_size = json.loads((env.base / "vae" / "config.json").read_text())["sample_size"]
    run.log(rf"--resolution not given: {vae_size}, the VAE's sample_size")
    args = json.loads((run.out / "training_args.json").read_text())
    assert args["resolution"] == vae_size and args["lora_rank"] is None  # null, not "None"
    from ldm import unet_size_config

    assert unet_size_config("unet-s")["block_out_channels"] == (64, 128, 192)


def test_push_to_hub_offline_says_the_pipeline_was_saved(t2i, env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="The pipeline was saved to .*pushing it to the Hub failed.*Push it later"):
        train(t2i, env, "push-offline", "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/x")
    assert (env.root / "push-offline" / "model_index.json").is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "drop_epoch"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_good_one(t2i, env, damage, caplog):
    name = f"damaged-{damage}"
    train(t2i, env, name, "--max_train_steps", "2", "--checkpointing_steps", "1")
    newest = env.root / name / "checkpoint-2"
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip_bytes":
        data = bytearray(weights.read_bytes())
        data[-200:-136] = b"\xff" * 64
        weights.write_bytes(bytes(data))
    else:
        state = json.loads((newest / "training_state.json").read_text())
        del state["epoch"]
        (newest / "training_state.json").write_text(json.dumps(state))
    run = train(t2i, env, name, "--max_train_steps", "3", "--checkpointing_steps", "1",
                "--resume_from_checkpoint", "latest")
    run.log(r"Skipping .*checkpoint-2: ")
    run.log(r"Resumed from .*checkpoint-1 at step 1")
    with pytest.raises(ValueError, match=r"checkpoint-2 is damaged: .*The newest good one is .*checkpoint-"):
        if damage == "drop_epoch":  # the rerun above rewrote checkpoint-2; damage it again
            state = json.loads((newest / "training_state.json").read_text())
            del state["epoch"]
            (newest / "training_state.json").write_text(json.dumps(state))
        else:
            weights.write_bytes(weights.read_bytes()[:-100])
        train(t2i, env, name, "--max_train_steps", "3", "--resume_from_checkpoint", str(newest))


def test_a_second_run_on_the_same_output_folder_is_refused(t2i, env):
    out = env.root / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ldm.checkpointing import "
                               f"lock_output_dir; lock_output_dir({str(out)!r}); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"Another run \(pid {holder.pid}\) is writing to .*locked"):
            train(t2i, env, "locked", "--max_train_steps", "1")
    finally:
        holder.kill()
        holder.wait()
    train(t2i, env, "locked", "--max_train_steps", "1")  # free again once that run is gone


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(t2i, env):
    import errno

    import ldm.checkpointing as checkpointing

    def full_at_2(step, tmp):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    checkpointing.BEFORE_PUBLISH_HOOKS.append(full_at_2)
    try:
        with pytest.raises(RuntimeError, match=r"Writing checkpoint-2 .* failed .*GiB are free there \(a full disk\?\)"
                                               r".*previous checkpoint .*checkpoint-1 is intact"):
            train(t2i, env, "disk-full", "--max_train_steps", "3", "--checkpointing_steps", "1")
    finally:
        checkpointing.BEFORE_PUBLISH_HOOKS.remove(full_at_2)
    out = env.root / "disk-full"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert checkpointing.checkpoint_problem(out / "checkpoint-1") is None


@pytest.mark.parametrize("flag", ["--checkpointing_steps", "--gradient_accumulation_steps", "--max_train_steps"])
def test_zero_counts_are_refused(t2i, env, flag):
    with pytest.raises(ValueError, match=f"{flag} must be at least 1, got 0"):
        t2i.parse_args(flags_for(env, env.root / "zero", "unet") + [flag, "0"])
