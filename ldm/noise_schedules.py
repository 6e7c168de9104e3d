"""Noise schedules: the training ``DDPMScheduler`` and the sampler saved with a trained pipeline.

Forward process q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I), a_t = prod_{s<=t} (1 - beta_s), with
``beta_schedule`` ``linear`` (beta from 1e-4 to 0.02, DDPM), ``scaled_linear`` (linear in sqrt(beta), Stable
Diffusion's 0.00085..0.012), or ``squaredcos_cap_v2`` (the cosine schedule of improved DDPM; ignores the beta range);
``rescale_betas_zero_snr`` rescales any of them to zero terminal SNR (Lin et al. 2024) and then sampling starts
from pure noise with ``timestep_spacing="trailing"``.

Reverse-process variance (``variance_type``): ``fixed_small`` (the posterior variance beta~_t, DDPM's lower bound),
``fixed_large`` (beta_t, its upper bound), ``learned_range`` (the model interpolates the two in log space, trained
with the hybrid loss of ``ldm.losses``). Only DDPM's stochastic sampler uses it, so a pipeline trained with
``fixed_large`` or ``learned_range`` is saved with a ``DDPMScheduler``; ``fixed_small`` ones with deterministic DDIM.

Flow-matching runs (``ldm.flow_matching``) train and sample with a ``FlowMatchEulerDiscreteScheduler`` instead.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
    learned_variance: bool = False,
    variance_type: str | None = None,
) -> DDPMScheduler:
    """The forward-process scheduler used for ``add_noise``, SNR and the VLB during training (``variance_type``
    defaults to ``learned_range`` with ``learned_variance``, else ``fixed_small``)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    variance_type = variance_type or ("learned_range" if learned_variance else "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    if (variance_type == "learned_range") != learned_variance:
        raise ValueError("variance_type 'learned_range' and learned_variance go together: the learned range is the "
                         "model's second half of output channels, trained by the hybrid loss.")
    if rescale_betas_zero_snr and prediction_type == "epsilon":
        raise ValueError(
            "Zero-terminal-SNR schedules (rescale_betas_zero_snr) make x0 unrecoverable from an epsilon prediction at "
            "the last timestep; use prediction_type 'v_prediction' (or 'sample')."
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr,
        variance_type=variance_type, clip_sample=False,
        timestep_spacing="trailing" if rescale_betas_zero_snr else "leading",
    )


def sampling_scheduler(train_scheduler):
    """The scheduler saved with the pipeline: the flow scheduler itself for flow matching; DDPM when the variance
    is learned or ``fixed_large`` (DDIM would ignore it); otherwise deterministic DDIM on the same schedule and
    prediction type."""
    if isinstance(train_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(train_scheduler.config)
    if train_scheduler.config.variance_type in ("learned", "learned_range", "fixed_large"):
        return DDPMScheduler.from_config(train_scheduler.config)
    return DDIMScheduler.from_config(train_scheduler.config, set_alpha_to_one=False, clip_sample=False)
