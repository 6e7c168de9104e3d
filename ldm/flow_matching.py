"""Flow matching (rectified flow), the forward process of SD3, minRF, SiT and Sana.

Notation (per sample): s in [0, 1] is the noise level (s = 1 is pure noise),

    x_s = (1 - s) x0 + s eps,        velocity  v = d x_s / d s = eps - x0   (the regression target, ``"flow"``)

and the denoiser's time input is t = 1000 s (``num_train_timesteps`` x s), as diffusers'
``FlowMatchEulerDiscreteScheduler`` feeds it when sampling (Euler steps x_{s'} = x_s + (s' - s) v, from s = 1).

Training noise levels: u ~ the ``weighting_scheme`` density of diffusers' ``compute_density_for_timestep_sampling``
(``logit_normal``: sigmoid of N(logit_mean, logit_std), SD3's default (0, 1); ``mode``: SD3's mode sampling with
``mode_scale``; ``uniform``), then the timestep shift s = shift u / (1 + (shift - 1) u) that the scheduler applies
too (``shift`` > 1 spends more of training and sampling at high noise, which larger images need; SD3 uses 3 at 1024 px).
:func:`resolution_shift` is SD3's resolution rule, shift = sqrt(pixels / 256^2).

The same densities also draw the integer timesteps of the DDPM objectives (t = floor(u T)); ``uniform`` there is
the classic t ~ U{0, ..., T - 1}.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


def flow_scheduler(num_train_timesteps: int = 1000, shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The flow scheduler a run trains with and its pipeline samples with (the shift is in its config)."""
    if not shift > 0 or not math.isfinite(shift):
        raise ValueError(f"timestep shift must be a positive number, got {shift}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def resolution_shift(height: int, width: int, base: int = 256) -> float:
    """SD3's resolution-dependent shift sqrt(h w / base^2) for an image of ``height`` x ``width`` pixels."""
    return math.sqrt(height * width) / base


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """s = shift u / (1 + (shift - 1) u): the map ``FlowMatchEulerDiscreteScheduler`` applies to its sigmas."""
    return shift * u / (1 + (shift - 1) * u)


def sample_levels(n: int, weighting_scheme: str, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u (n,) in [0, 1] from the ``weighting_scheme`` density (diffusers' helper, drawn from ``generator``)."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    return compute_density_for_timestep_sampling(weighting_scheme, n, logit_mean, logit_std, mode_scale,
                                                 device=generator.device, generator=generator)


def add_flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps for x0, eps (B, C, H, W) and s (B,)."""
    s = sigmas.to(latents.dtype)[:, None, None, None]
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity eps - x0 the model regresses (B, C, H, W)."""
    return noise - latents
