"""Noise schedules: the training ``DDPMScheduler`` and the sampler saved with a trained pipeline.

Forward process q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I), a_t = prod_{s<=t} (1 - beta_s), with
``beta_schedule`` ``linear`` (beta from 1e-4 to 0.02, DDPM), ``scaled_linear`` (linear in sqrt(beta), Stable
Diffusion's 0.00085..0.012), or ``squaredcos_cap_v2`` (the cosine schedule of improved DDPM; ignores the beta range);
``rescale_betas_zero_snr`` rescales any of them to zero terminal SNR (Lin et al. 2024) and then sampling starts
from pure noise with ``timestep_spacing="trailing"``.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
    learned_variance: bool = False,
) -> DDPMScheduler:
    """The forward-process scheduler used for ``add_noise``, SNR and the VLB during training."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr and prediction_type == "epsilon":
        raise ValueError(
            "Zero-terminal-SNR schedules (rescale_betas_zero_snr) make x0 unrecoverable from an epsilon prediction at "
            "the last timestep; use prediction_type 'v_prediction' (or 'sample')."
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr,
        variance_type="learned_range" if learned_variance else "fixed_small", clip_sample=False,
        timestep_spacing="trailing" if rescale_betas_zero_snr else "leading",
    )


def sampling_scheduler(train_scheduler: DDPMScheduler):
    """The scheduler saved with the pipeline: DDPM with the learned-range variance when the model learned it
    (DDIM would ignore it), otherwise deterministic DDIM on the same schedule and prediction type."""
    if train_scheduler.config.variance_type in ("learned", "learned_range"):
        return DDPMScheduler.from_config(train_scheduler.config)
    return DDIMScheduler.from_config(train_scheduler.config, set_alpha_to_one=False, clip_sample=False)
