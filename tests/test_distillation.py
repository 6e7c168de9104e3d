"""Progressive distillation (issue #4): exact two-step targets (Salimans & Ho 2022, Algorithm 2), the
``ProgressiveDistillationScheduler``, and ``training/distill.py`` end to end on tiny U-Net and DiT teachers
(halving rounds, guidance folding of Meng et al. 2023, per-round resumption).

The trainer runs in-process (``main(parse_args([...]))``) with 2-3 optimizer steps per stage on a 4-image folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from ldm import DiTModel, ProgressiveDistillationScheduler, UNetModel
from ldm.distillation import sample_student_times, two_step_target, x_loss
from ldm.guidance import combine as guided_x0
from ldm.tiny import tiny_dit, tiny_pipeline, tiny_unet
from pipelines import LatentPipeline

from conftest import load_script as load_script_at
from conftest import SIZE, gen

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "distill.py"
SCHED_LOGGER = "ldm.schedulers.progressive_distillation"
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]


# ---------------------------------------------------------------------------------------------- helpers
def teacher_x0_fn(model, scheduler, embeds):
    """(z (B,C,H,W), tau (B,)) -> the frozen teacher's x-prediction under ``scheduler``'s prediction type."""
    def x0(z, tau):
        with torch.no_grad():
            return scheduler.predict_x0(model(z, tau, embeds).sample, tau, z)
    return x0


def v_from_x(scheduler, x0, z, tau):
    """The v-prediction whose x-prediction at (z, tau) is ``x0``: x = alpha z - sigma v."""
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in scheduler.alpha_sigma(tau))
    return (alpha * z - x0) / sigma


def pd_scheduler(prediction_type="v_prediction", zero_snr=True, num_train_timesteps=1000, steps=64, **kw):
    return ProgressiveDistillationScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                                            rescale_betas_zero_snr=zero_snr, num_distilled_steps=steps, **kw)


def frozen_unet():
    return tiny_unet().eval().requires_grad_(False)


def load_script():
    return load_script_at(SCRIPT, "distill_script")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_distill(script, teacher: Path, output_dir: Path, data: Path, *extra: str) -> list[str]:
    """Run the trainer in-process; returns the INFO+ messages of its ``distill`` logger."""
    argv = ["--teacher", str(teacher), "--train_data_dir", str(data), "--cache_dir", str(data.parent / "hf-cache"),
            "--resolution", str(SIZE), "--train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
            "--checkpointing_steps", "2", "--output_dir", str(output_dir), *extra]
    logger, handler = logging.getLogger("distill"), _Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        script.main(script.parse_args(argv))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.messages


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class ForwardCounter:
    """Counts the denoiser's forward calls and their batch sizes."""

    def __init__(self, module):
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Tiny U-Net and DiT teacher pipelines with a v-prediction, zero-terminal-SNR, trailing DDIM scheduler, and
    ``data``: a 4-image imagefolder with captions."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    folders = {"data": data}
    for kind in ("unet", "dit"):
        pipe = tiny_pipeline(kind)
        pipe.scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
            rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
        )
        folders[kind] = root / f"teacher-{kind}"
        pipe.save_pretrained(folders[kind])
    return folders


@pytest.fixture(scope="module")
def unet_run(script, teachers) -> tuple[Path, list[str]]:
    """8 -> 4 -> 2 steps: two halving rounds of the U-Net teacher."""
    out = teachers["data"].parent / "unet-distilled"
    logs = run_distill(script, teachers["unet"], out, teachers["data"], "--teacher_steps", "8", "--rounds", "2",
                       "--steps_per_round", "3")
    return out, logs


@pytest.fixture(scope="module")
def guided_run(script, teachers) -> tuple[Path, list[str]]:
    """DiT with EMA: guidance folded in on the 4-step grid, then one halving round to 2 steps."""
    out = teachers["data"].parent / "dit-guided"
    logs = run_distill(script, teachers["dit"], out, teachers["data"], "--teacher_steps", "4", "--rounds", "1",
                       "--steps_per_round", "2", "--guidance_distillation", "--use_ema",
                       "--guidance_learning_rate", "2e-3", "--report_to", "tensorboard")
    return out, logs


# ---------------------------------------------------------------------------------------------- exact targets
GRIDS = {"T1000-N64": (1000, 64), "T1024-N64": (1024, 64)}  # fractional tau = k * 15.625 - 1, integer k * 16 - 1
TEACHERS = {"v": ("v_prediction", True), "x": ("sample", True), "eps": ("epsilon", False)}


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_one_student_step_lands_on_the_teachers_two_step_z(grid, teacher_kind):
    """Algorithm 2: DDIM from z_t with the student prediction x~ reaches the teacher's z'' exactly, at the top
    (pure noise when the SNR reaches zero), in the middle, and on the last interval (sigma'' = 0, x~ = x_teacher)."""
    num_train_timesteps, n = GRIDS[grid]
    prediction_type, zero_snr = TEACHERS[teacher_kind]
    teacher_sched = pd_scheduler(prediction_type, zero_snr, num_train_timesteps, 2 * n)
    student_sched = pd_scheduler("v_prediction", zero_snr, num_train_timesteps, n)
    teacher_sched.set_timesteps(2 * n)
    student_sched.set_timesteps(n)
    teacher = frozen_unet()
    torch.manual_seed(0)
    x0, noise, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    teacher_x0 = teacher_x0_fn(teacher, teacher_sched, embeds)
    grid2n = teacher_sched.time_grid(2 * n)

    for i in (n, n // 2 + 1, 2, 1):  # student step i goes t = i / N -> (i - 1) / N
        j = 2 * (n - i)
        tau, tau_mid, tau_next = (grid2n[j + k].expand(2) for k in range(3))
        z_t = teacher_sched.add_noise(x0, noise, tau)
        if i == n and zero_snr:
            assert torch.equal(z_t, noise)  # the top of the grid is pure noise
        # the teacher's two DDIM steps through the public scheduler API
        with torch.no_grad():
            z_mid = teacher_sched.step(teacher(z_t, tau, embeds).sample, tau[0], z_t).prev_sample
            z_two = teacher_sched.step(teacher(z_mid, tau_mid, embeds).sample, tau_mid[0], z_mid).prev_sample

        x_target, z_next = two_step_target(teacher_x0, teacher_sched, z_t, tau, tau_mid, tau_next)
        scale = z_two.abs().max().item()
        torch.testing.assert_close(z_next, z_two, rtol=1e-5, atol=1e-5 * scale)
        student_v = v_from_x(student_sched, x_target, z_t, tau)
        out = student_sched.step(student_v, tau[0], z_t)
        torch.testing.assert_close(out.prev_sample, z_two, rtol=1e-5, atol=1e-5 * scale, msg=f"step i={i}")
        torch.testing.assert_close(out.pred_original_sample, x_target, rtol=1e-4, atol=1e-4)
        if i == 1:  # last interval: z'' is the clean end point and the target is the teacher's x at t - 0.5 / N
            assert float(tau_next[0]) == -1.0
            torch.testing.assert_close(x_target, teacher_x0(z_mid, tau_mid), rtol=0, atol=1e-6)
            torch.testing.assert_close(z_two, x_target, rtol=0, atol=1e-6)


@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_teacher_two_steps_match_diffusers_ddim_on_an_integer_grid(teacher_kind):
    """On T = 1024 the 2N grid is integer, and the teacher's DDIM steps equal diffusers' trailing DDIMScheduler."""
    prediction_type, zero_snr = TEACHERS[teacher_kind]
    n = 8
    ours = pd_scheduler(prediction_type, zero_snr, 1024, 2 * n)
    ddim = DDIMScheduler(num_train_timesteps=1024, beta_schedule="linear", prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(2 * n)
    ddim.set_timesteps(2 * n)
    assert ours.timesteps.tolist() == ddim.timesteps.float().tolist()
    teacher = frozen_unet()
    torch.manual_seed(1)
    embeds = torch.randn(2, 5, 32)
    z_ours = z_ddim = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for t_ours, t_ddim in zip(ours.timesteps, ddim.timesteps):
            z_ours = ours.step(teacher(z_ours, t_ours.expand(2), embeds).sample, t_ours, z_ours).prev_sample
            z_ddim = ddim.step(teacher(z_ddim, t_ddim.expand(2), embeds).sample, t_ddim, z_ddim).prev_sample
    torch.testing.assert_close(z_ours, z_ddim, rtol=1e-4, atol=1e-4 * z_ddim.abs().max().item())


def test_sample_student_times_are_consecutive_points_of_the_teacher_grid():
    sched = pd_scheduler(steps=8)
    tau, tau_mid, tau_next = sample_student_times(sched, 8, 256, gen(0))
    grid = sched.time_grid(16)
    for a, b, c in zip(tau.tolist(), tau_mid.tolist(), tau_next.tolist()):
        j = grid.tolist().index(a)
        assert j % 2 == 0 and (b, c) == (grid[j + 1].item(), grid[j + 2].item())
    assert set(tau.tolist()) == set(sched.time_grid(8)[:-1].tolist())  # every student step i in 1..N is drawn


def test_guided_x0_is_classifier_free_guidance():
    x_u, x_c = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    s = torch.tensor([1.0, 3.0])
    out = guided_x0(x_u, x_c, s)
    torch.testing.assert_close(out[0], x_c[0])  # s = 1: the conditional branch
    torch.testing.assert_close(out[1], 3.0 * x_c[1] - 2.0 * x_u[1])  # (1 + w) x_c - w x_u with w = s - 1


# ---------------------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize("num_train_timesteps", [1000, 1024])
def test_grid_is_trailing_and_halving_keeps_every_point(num_train_timesteps):
    sched = pd_scheduler(num_train_timesteps=num_train_timesteps, steps=64)
    for n in (64, 32, 8, 1):
        grid = sched.time_grid(n)
        expected = torch.tensor([k * num_train_timesteps / n - 1 for k in range(n, -1, -1)])
        torch.testing.assert_close(grid, expected, rtol=0, atol=1e-4)
        assert grid[0] == num_train_timesteps - 1 and grid[-1] == -1
        torch.testing.assert_close(sched.time_grid(2 * n)[::2], grid, rtol=0, atol=0)  # halving is exact
    sched.set_timesteps()
    assert sched.num_inference_steps == 64
    torch.testing.assert_close(sched.timesteps, sched.time_grid(64)[:-1], rtol=0, atol=0)


def test_alpha_sigma_matches_diffusers_zero_snr_schedule_and_top_is_pure_noise():
    sched = pd_scheduler()
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=True,
                         prediction_type="v_prediction")
    t = torch.arange(1000)
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, ddim.alphas_cumprod, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000), rtol=0, atol=1e-6)
    assert [float(v) for v in sched.alpha_sigma(999)] == [0.0, 1.0]  # pure noise at the top
    assert [float(v) for v in sched.alpha_sigma(-1)] == [1.0, 0.0]  # clean below the first timestep
    a_lo, a_hi, a_mid = (sched.alpha_sigma(x)[0] ** 2 for x in (14.0, 15.0, 14.625))  # linear in alpha-bar
    torch.testing.assert_close(a_mid, a_lo + 0.625 * (a_hi - a_lo), rtol=1e-6, atol=1e-7)
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(sched.add_noise(x0, noise, torch.tensor([999.0, 999.0])), noise, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 64])
def test_sampling_with_an_exact_oracle_returns_x0(prediction_type, steps):
    sched = pd_scheduler(prediction_type, steps=steps)
    sched.set_timesteps()
    x0 = torch.randn(2, 4, 8, 8, generator=gen(0))
    z = torch.randn(2, 4, 8, 8, generator=gen(1)) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = x0 if prediction_type == "sample" else v_from_x(sched, x0, z, t)
        z = sched.step(out, t, z).prev_sample
    torch.testing.assert_close(z, x0, rtol=1e-4, atol=1e-4)


def test_other_step_count_warns(caplog):
    sched = pd_scheduler(steps=4)
    with caplog.at_level(logging.WARNING, logger=SCHED_LOGGER):
        sched.set_timesteps(4)
        sched.set_timesteps()
    assert not [r for r in caplog.records if r.name == SCHED_LOGGER]
    with caplog.at_level(logging.WARNING, logger=SCHED_LOGGER):
        sched.set_timesteps(8)
    (message,) = [r.getMessage() for r in caplog.records if r.name == SCHED_LOGGER]
    assert "distilled for 4 steps" in message and "8 steps" in message and "num_inference_steps=4" in message
    assert len(sched.timesteps) == 8


def test_step_off_the_grid_raises():
    sched = pd_scheduler(steps=4)
    sched.set_timesteps()
    z = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="not on this scheduler's 4-step grid"):
        sched.step(z, 500.0, z)
    with pytest.raises(ValueError, match="not on this scheduler's"):
        sched.step(z, -1.0, z)  # nothing below the clean end


def test_save_load_round_trip(tmp_path):
    sched = pd_scheduler(num_train_timesteps=1024, steps=8, teacher_steps=16, distillation_round=3,
                         guidance_scale=4.0, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.save_pretrained(tmp_path)
    loaded = ProgressiveDistillationScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    assert (loaded.config.num_distilled_steps, loaded.config.teacher_steps, loaded.config.distillation_round,
            loaded.config.guidance_scale) == (8, 16, 3, 4.0)
    torch.testing.assert_close(loaded.alphas_cumprod, sched.alphas_cumprod, rtol=0, atol=0)
    loaded.set_timesteps()
    sched.set_timesteps()
    torch.testing.assert_close(loaded.timesteps, sched.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize("num_train_timesteps, steps", [(1024, 8), (1000, 8), (1024, 64)])
def test_diffusers_ddim_from_config_samples_the_same_grid(num_train_timesteps, steps, tmp_path):
    """As built by distill.py (explicit arguments), and as loaded from a saved pipeline (every key in the json).

    diffusers' ``from_config`` drops arguments left at their defaults, so an in-memory scheduler built with the
    default ``timestep_spacing`` would give DDIM's own default ("leading")."""
    sched = pd_scheduler(num_train_timesteps=num_train_timesteps, steps=steps, timestep_spacing="trailing")
    sched.set_timesteps()
    pd_scheduler(num_train_timesteps=num_train_timesteps, steps=steps).save_pretrained(tmp_path)
    saved = ProgressiveDistillationScheduler.from_pretrained(tmp_path)
    assert DDIMScheduler.from_config(saved.config).config.timestep_spacing == "trailing"
    ddim = DDIMScheduler.from_config(sched.config)
    assert ddim.config.timestep_spacing == "trailing" and ddim.config.rescale_betas_zero_snr
    assert ddim.config.prediction_type == "v_prediction"
    ddim.set_timesteps(steps)
    assert ddim.timesteps.float().tolist() == sched.timesteps.tolist()
    # the same sampler (DDIM does not clip here): a fixed linear "model" gives the same end point
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False)
    ddim.set_timesteps(steps)
    weight = torch.randn(4, 4, generator=gen(2)) * 0.3
    z_a = z_b = torch.randn(2, 4, 4, 4, generator=gen(3))
    for t_a, t_b in zip(sched.timesteps, ddim.timesteps):
        z_a = sched.step(torch.einsum("oc,bchw->bohw", weight, z_a), t_a, z_a).prev_sample
        z_b = ddim.step(torch.einsum("oc,bchw->bohw", weight, z_b), t_b, z_b).prev_sample
    torch.testing.assert_close(z_a, z_b, rtol=1e-4, atol=1e-4)


def test_epsilon_with_zero_terminal_snr_is_rejected():
    with pytest.raises(ValueError, match="epsilon prediction cannot give x0 from pure noise"):
        pd_scheduler("epsilon", zero_snr=True)
    with pytest.raises(ValueError, match="prediction_type"):
        pd_scheduler("mu")
    assert pd_scheduler("epsilon", zero_snr=False).config.prediction_type == "epsilon"


# ---------------------------------------------------------------------------------------------- trainer end to end
def check_stage(folder: Path, steps: int, teacher_steps: int, round_: int, guided: bool, denoiser_cls, caplog):
    """``folder`` loads as a pipeline with a distillation scheduler and samples with ``steps`` steps by default."""
    pipe = LatentPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.denoiser) is denoiser_cls and not pipe.denoiser.training
    sched = pipe.scheduler
    assert type(sched) is ProgressiveDistillationScheduler
    assert (sched.config.num_distilled_steps, sched.config.teacher_steps, sched.config.distillation_round) == \
        (steps, teacher_steps, round_)
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    assert sched.config.rescale_betas_zero_snr and sched.config.num_train_timesteps == 1000
    assert pipe.guidance_distilled == guided and pipe.denoiser.config.guidance_embedding == guided
    assert sched.config.guidance_scale == (5.0 if guided else None)

    prompts = ["a red square", "a blue circle"]
    with caplog.at_level(logging.WARNING, logger=SCHED_LOGGER), ForwardCounter(pipe.denoiser) as calls:
        latents = pipe(prompts, height=SIZE, width=SIZE, output_type="latent", generator=gen(0)).images
    assert not [r for r in caplog.records if r.name == SCHED_LOGGER]  # the default step count does not warn
    # one forward per step: B for the guided student; the unguided one doubles the batch for CFG (7.5 by default)
    assert calls.batches == [2 if guided else 4] * steps
    assert latents.shape == (2, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latents).all()

    with caplog.at_level(logging.WARNING, logger=SCHED_LOGGER), ForwardCounter(pipe.denoiser) as calls:
        pipe(prompts[0], height=SIZE, width=SIZE, num_inference_steps=2 * steps, guidance_scale=3.0,
             output_type="latent", generator=gen(0))
    assert len(calls.batches) == 2 * steps
    assert [r for r in caplog.records if r.name == SCHED_LOGGER and f"distilled for {steps} steps" in r.getMessage()]
    caplog.clear()
    if guided:  # the recorded default scale, and guidance_scale reaches the denoiser as an input
        def run(scale):
            return pipe(prompts, height=SIZE, width=SIZE, guidance_scale=scale, output_type="latent",
                        generator=gen(0)).images
        torch.testing.assert_close(run(5.0), latents, rtol=0, atol=0)
        assert (run(1.5) - latents).abs().max() > 0
        # the fold's range (1 to 8 by default) is recorded; a scale outside it warns, one inside does not
        assert sched.config.guidance_scale_range == [1.0, 8.0]
        with caplog.at_level(logging.WARNING, logger="pipelines.pipeline_latent"):
            run(8.0)
            assert not [r for r in caplog.records if "outside the range" in r.getMessage()]
            run(12.0)
        warned = "outside the range this student was distilled for (1 to 8)"
        assert [r for r in caplog.records if warned in r.getMessage()]

    card = (folder / "README.md").read_text()
    assert f"**{steps}-step** student" in card and f"{teacher_steps}-step grid" in card
    return card


def test_two_rounds_halve_the_steps_and_each_student_is_a_pipeline(unet_run, teachers, caplog):
    out, logs = unet_run
    assert sorted(p.name for p in out.iterdir() if p.name not in ("logs", ".lock")) == \
        ["round-1-4-steps", "round-2-2-steps"]  # no work-*/checkpoint/.tmp-* folder left behind
    assert not list(out.rglob("checkpoint-*")) and not list(out.rglob(".tmp*"))
    for folder, steps, round_ in (("round-1-4-steps", 4, 1), ("round-2-2-steps", 2, 2)):
        card = check_stage(out / folder, steps, 2 * steps, round_, False, UNetModel, caplog)
        assert str(teachers["unet"]) in card and f"round {round_}" in card
        assert f'from_pretrained("{folder}")' in card  # the card names the stage, not a temporary folder
    assert sum("Stage round-" in m for m in logs) == 2


def test_guidance_distillation_folds_cfg_into_one_forward(guided_run, teachers, caplog):
    out, logs = guided_run
    assert sorted(p.name for p in out.iterdir() if p.name not in ("logs", ".lock")) == \
        ["guided-4-steps", "round-1-2-steps"]
    assert not list(out.rglob("checkpoint-*")) and not list(out.rglob(".tmp*"))
    check_stage(out / "guided-4-steps", 4, 4, 0, True, DiTModel, caplog)
    card = check_stage(out / "round-1-2-steps", 2, 4, 1, True, DiTModel, caplog)
    assert str(teachers["dit"]) in card and "runs **one** denoiser forward per step" in card
    # the fold trains at --guidance_learning_rate, the halving round at --learning_rate
    assert sum("Stage guided-4-steps:" in m and m.endswith("peak learning rate 0.002") for m in logs) == 1
    assert sum("Stage round-1-2-steps:" in m and m.endswith("peak learning rate 0.001") for m in logs) == 1
    # one tensorboard run with a loss/lr curve per stage, each starting at its step 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "logs" / "distill").glob("events.out.tfevents.*")
    curves = EventAccumulator(str(events))
    curves.Reload()
    for stage, steps, peak in (("guided-4-steps", 2, 2e-3), ("round-1-2-steps", 2, 1e-3)):
        assert [e.step for e in curves.Scalars(f"{stage}/loss")] == list(range(1, steps + 1))
        # linear decay to 0 within the stage: after step 1 of 2 the rate is half the stage's peak
        assert curves.Scalars(f"{stage}/lr")[0].value == pytest.approx(peak / 2)


def test_rerun_skips_finished_rounds_and_retrains_only_a_missing_one(script, unet_run, teachers, tmp_path):
    original, _ = unet_run
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    before = {name: digest(out / name) for name in ("round-1-4-steps", "round-2-2-steps")}
    args = ("--teacher_steps", "8", "--rounds", "2", "--steps_per_round", "3")

    logs = run_distill(script, teachers["unet"], out, teachers["data"], *args)
    assert not [m for m in logs if m.startswith("Stage ")]  # nothing trained
    assert sum("is done; using it as the next teacher" in m for m in logs) == 2
    assert {name: digest(out / name) for name in before} == before

    shutil.rmtree(out / "round-2-2-steps")
    logs = run_distill(script, teachers["unet"], out, teachers["data"], *args)
    assert [m for m in logs if m.startswith("Stage ")] == [
        "Stage round-2-2-steps: 4 -> 2 steps, 3 optimizer steps, peak learning rate 0.001"]
    assert digest(out / "round-1-4-steps") == before["round-1-4-steps"]
    # the re-trained round repeats the original one (same seeded draws, same teacher)
    retrained = UNetModel.from_pretrained(out / "round-2-2-steps", subfolder="denoiser")
    first = UNetModel.from_pretrained(original / "round-2-2-steps", subfolder="denoiser")
    for (name, a), b in zip(retrained.state_dict().items(), first.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not list(out.glob("work-*"))


def test_a_flow_matching_teacher_is_refused_with_the_reason(script, teachers, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = tmp_path / "flow-teacher"
    shutil.copytree(teachers["unet"], flow)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(flow / "scheduler")
    with pytest.raises(ValueError, match="is a flow-matching teacher .* halving argument holds for any deterministic"):
        run_distill(script, flow, tmp_path / "out", teachers["data"], "--teacher_steps", "8", "--rounds", "1")
    assert not (tmp_path / "out" / "round-1-4-steps").exists()


def test_teacher_steps_must_halve_exactly(script):
    with pytest.raises(ValueError, match="cannot be halved 3 times"):
        script.parse_args(["--teacher", "x", "--train_data_dir", "d", "--teacher_steps", "12", "--rounds", "3"])


@pytest.mark.parametrize("rounds", ["-1", "0"], ids=["negative", "zero-unguided"])
def test_rounds_must_leave_something_to_do(script, rounds):
    with pytest.raises(ValueError, match="give at least 1 halving round"):
        script.parse_args(["--teacher", "x", "--train_data_dir", "d", "--rounds", rounds])
    # zero rounds is fine when guidance is folded in (a guidance-only stage)
    script.parse_args(["--teacher", "x", "--train_data_dir", "d", "--rounds", "0", "--guidance_distillation"])


# ---------------------------------------------------------------------------------------------- guidance fold / teacher
@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_guidance_student_starts_as_the_teachers_conditional_branch(script, build):
    teacher = build().eval().requires_grad_(False)
    student = script.make_student(teacher, guided_student=True)
    assert student.config.guidance_embedding and student.training
    assert all(p.requires_grad for p in student.parameters())
    z, tau, embeds = torch.randn(2, 4, 8, 8, generator=gen(0)), torch.tensor([999.0, 250.5]), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = teacher(z, tau, embeds).sample
        for scale in (1.0, 4.0, 8.0):
            got = student(z, tau, embeds, guidance=torch.full((2,), scale)).sample
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = script.make_student(teacher, guided_student=False)
    assert not plain.config.guidance_embedding and all(p.requires_grad for p in plain.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training  # the teacher untouched


def _record_calls(module, calls: list[dict], keep_grad: bool) -> None:
    """Record every forward of ``module``: mode, autograd state, inputs, output, and (``keep_grad``) dL/d output."""
    def hook(m, args, kwargs, out):
        rec = dict(training=m.training, grad_enabled=torch.is_grad_enabled(),
                   requires_grad=any(p.requires_grad for p in m.parameters()), z=args[0].detach().clone(),
                   tau=args[1].detach().clone(), embeds=args[2].detach().clone(),
                   mask=kwargs["encoder_attention_mask"].clone(), guidance=kwargs.get("guidance"),
                   out=out.sample.detach().clone())
        if keep_grad:
            out.sample.register_hook(lambda g: rec.__setitem__("grad", g.detach().clone()))
        calls.append(rec)
    module.register_forward_hook(hook, with_kwargs=True)


def _guided_fold_target(rec, call, sched, empty_embeds, empty_mask):
    """The guidance fold's target for one recorded student call: the teacher ran once on [unconditional;
    conditional] at the student's z_t and tau, and its guided x at the student's scale is the target."""
    z, tau, n = rec["z"], rec["tau"], rec["z"].shape[0]
    assert call["guidance"] is None
    torch.testing.assert_close(call["z"], torch.cat([z, z]), rtol=0, atol=0)
    torch.testing.assert_close(call["embeds"][n:], rec["embeds"], rtol=0, atol=0)
    torch.testing.assert_close(call["mask"][n:], rec["mask"], rtol=0, atol=0)
    torch.testing.assert_close(call["embeds"][:n], empty_embeds.expand(n, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(call["mask"][:n], empty_mask.expand(n, -1), rtol=0, atol=0)
    assert set(tau.tolist()) <= set(sched.time_grid(4)[:-1].tolist())
    scale = rec["guidance"]
    assert scale.shape == (n,) and ((scale >= 1.0) & (scale <= 8.0)).all()
    x_uncond, x_cond = sched.predict_x0(call["out"], call["tau"], call["z"]).chunk(2)
    return guided_x0(x_uncond, x_cond, scale)


def _halving_target(rec, teacher, sched, stage, empty_embeds, empty_mask):
    """An unguided halving round's target for one recorded student call (no scale), Algorithm 2's two teacher
    steps recomputed from the student's own inputs; also which rows had their caption dropped."""
    z, tau, n = rec["z"], rec["tau"], rec["z"].shape[0]
    assert rec["guidance"] is None
    dropped = [bool((rec["embeds"][b] == empty_embeds[0]).all() and (rec["mask"][b] == empty_mask[0]).all())
               for b in range(n)]
    grid = sched.time_grid(2 * stage.student_steps).tolist()
    j = torch.tensor([grid.index(t) for t in tau.tolist()])
    assert (j % 2 == 0).all()
    with torch.no_grad():
        target, _ = two_step_target(
            lambda zz, tt: sched.predict_x0(teacher(zz, tt, rec["embeds"], encoder_attention_mask=rec["mask"]).sample,
                                            tt, zz),
            sched, z, tau, torch.tensor(grid)[j + 1], torch.tensor(grid)[j + 2])
    return target, dropped


@pytest.mark.parametrize("kind", ["dit-guidance-fold", "unet-round"])
def test_stage_trains_the_student_on_the_frozen_teachers_target(script, teachers, kind):
    """Run one stage of the real trainer with a teacher we hold (left in train mode on purpose) and probe it:

    * every teacher forward runs in eval mode, without autograd, on frozen weights, which are unchanged afterwards;
    * the gradient reaching the student's v output is exactly that of max(SNR, 1) ||x_student - x~||^2 with x~ the
      teacher's classifier-free-guided x (guidance fold, scale s given to the student) or the Algorithm-2 two-step
      target recomputed here from the student's own inputs (halving round).
    """
    from ldm.data.latent_cache import encode_text
    from ldm.distillation import truncated_snr_weight
    from ldm.components import load_frozen_components, load_pipeline_denoiser
    from ldm.distributed import make_accelerator

    guided = kind == "dit-guidance-fold"
    teacher_path = teachers["dit" if guided else "unet"]
    out = teachers["data"].parent / f"probe-{kind}"
    args = script.parse_args([
        "--teacher", str(teacher_path), "--train_data_dir", str(teachers["data"]),
        "--cache_dir", str(teachers["data"].parent / "hf-cache"), "--resolution", str(SIZE),
        "--learning_rate", "1e-3", "--report_to", "none", "--teacher_steps", "4", "--rounds", "1",
        "--steps_per_round", "2", "--caption_dropout", "0.5", "--output_dir", str(out), "--train_batch_size", "4",
        *(["--guidance_distillation"] if guided else []),
    ])
    stage = script.plan_stages(args)[0]
    assert (stage.round, stage.guided_student, stage.teacher_steps, stage.student_steps) == \
        ((0, True, 4, 4) if guided else (1, False, 4, 2))
    accelerator = make_accelerator(out, report_to="none")
    vae, text_encoder, tokenizer = load_frozen_components(args.teacher)
    teacher = load_pipeline_denoiser(args.teacher).train()  # the stage must switch it to eval and freeze it
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = script.make_student(teacher, stage.guided_student)
    teacher_calls, student_calls = [], []
    _record_calls(teacher, teacher_calls, keep_grad=False)
    _record_calls(student, student_calls, keep_grad=True)
    sched = pd_scheduler(steps=stage.student_steps, teacher_steps=stage.teacher_steps)
    trained = script.train_stage(args, accelerator, stage, teacher, "v_prediction", student, vae, text_encoder,
                                 tokenizer, sched, sched)
    accelerator.end_training()
    with torch.no_grad():
        empty_embeds, empty_mask = encode_text(tokenizer, text_encoder, [""])  # (1, L, D), (1, L)

    assert {(c["training"], c["grad_enabled"], c["requires_grad"]) for c in teacher_calls} == {(False, False, False)}
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), f"the teacher's {name} changed"
    assert max((trained.state_dict()[k] - v).abs().max().item() for k, v in before.items()) > 1e-5  # it trained
    assert len(student_calls) == 2 and len(teacher_calls) == (2 if guided else 4)
    dropped_total = []
    for step, rec in enumerate(student_calls):
        z, tau, n = rec["z"], rec["tau"], rec["z"].shape[0]
        if guided:
            target = _guided_fold_target(rec, teacher_calls[step], sched, empty_embeds, empty_mask)
        else:
            target, dropped = _halving_target(rec, teacher, sched, stage, empty_embeds, empty_mask)
            dropped_total.extend(dropped)
        x_student = sched.predict_x0(rec["out"], tau, z)
        _, sigma = sched.alpha_sigma(tau)
        weight = truncated_snr_weight(sched, tau)
        expected = -(sigma * 2 * weight / z[0].numel() / n).reshape(-1, 1, 1, 1) * (x_student - target)
        torch.testing.assert_close(rec["grad"], expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    if guided:
        assert trained.time_embed.guidance_embedding.linear_2.weight.abs().max() > 0  # the guidance branch learns
    else:  # caption dropout (p = 0.5 here) keeps the unconditional branch trained for classifier-free guidance
        assert 0 < sum(dropped_total) < len(dropped_total)


def test_loss_weight_is_truncated_snr():
    from ldm.distillation import truncated_snr_weight

    sched = pd_scheduler(steps=4)
    tau = torch.tensor([999.0, 749.0, 499.0, 100.0, 10.0])
    alpha, sigma = sched.alpha_sigma(tau)
    snr = alpha.double() ** 2 / sigma.double() ** 2
    weight = truncated_snr_weight(sched, tau)
    assert weight[0] == 1.0 and weight[1] == 1.0 and weight[-1] > 10  # max(SNR, 1): 1 where SNR < 1
    torch.testing.assert_close(weight.double(), snr.clamp(min=1.0), rtol=1e-5, atol=0)
    x_pred, x_target = torch.randn(5, 4, 4, 4, generator=gen(0)), torch.randn(5, 4, 4, 4, generator=gen(1))
    expected = (weight * (x_pred - x_target).pow(2).mean((1, 2, 3))).mean()
    torch.testing.assert_close(x_loss(sched, x_pred, x_target, tau), expected)


# ---------------------------------------------------------------------------------------------- the loss trains
def test_distillation_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    sched = pd_scheduler(steps=4)
    teacher = frozen_unet()
    student = tiny_unet().train()
    student.load_state_dict(teacher.state_dict())
    latents, noise, embeds = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    tau, tau_mid, tau_next = sample_student_times(sched, 4, 4, gen(0))
    z_t = sched.add_noise(latents, noise, tau)
    target, _ = two_step_target(teacher_x0_fn(teacher, sched, embeds), sched, z_t, tau, tau_mid, tau_next)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)

    def loss():
        return x_loss(sched, sched.predict_x0(student(z_t, tau, embeds).sample, tau, z_t), target, tau)

    first = loss().item()
    assert first > 0
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.3 * first


def test_a_stage_resumes_only_with_the_arguments_it_started_with(script, tmp_path):
    base = ["--teacher", "teacher-a", "--dataset_name", "shapes", "--output_dir", str(tmp_path)]
    args = script.parse_args(base)
    stage = script.plan_stages(args)[0]
    work = tmp_path / f"work-{stage.folder}"
    script.check_stage_arguments(args, stage, work)  # first run: recorded
    script.check_stage_arguments(script.parse_args(base), stage, work)  # the same arguments resume
    changed = script.parse_args(base[:1] + ["teacher-b"] + base[2:] + ["--learning_rate", "1e-3"])
    with pytest.raises(ValueError, match=r"--teacher 'teacher-a' -> 'teacher-b', --learning_rate 5e-05 -> 0.001"):
        script.check_stage_arguments(changed, stage, work)
    with pytest.raises(ValueError, match=r"--balance_by None -> 'hexcode'"):  # rows drawn otherwise: another run
        script.check_stage_arguments(script.parse_args(base + ["--balance_by", "hexcode"]), stage, work)
