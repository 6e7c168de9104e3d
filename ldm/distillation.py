"""Progressive distillation targets (Salimans & Ho 2022, Algorithm 2) and guidance folding (Meng et al. 2023).

All times are discrete timesteps tau of a ``ProgressiveDistillationScheduler`` (fractional allowed), with
alpha = sqrt(alpha-bar(tau)), sigma = sqrt(1 - alpha-bar(tau)); x-predictions are (B, C, H, W).

Student step i of N goes t -> t - 1/N. The teacher covers it in two DDIM steps t -> t - 0.5/N -> t - 1/N, reaching
z''; the student's x-target is the x whose single DDIM step from z_t lands exactly on z'':

    x~ = (z'' - (sigma'' / sigma_t) z_t) / (alpha'' - (sigma'' / sigma_t) alpha_t)

(on the last interval sigma'' = 0, alpha'' = 1 and x~ = z'' = the teacher's x-prediction at t - 0.5/N), trained with
the truncated-SNR weight max(SNR(t), 1) on the x error.
"""

from __future__ import annotations

from typing import Callable

import torch

XPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (B,C,H,W), tau (B,)) -> x0_hat (B,C,H,W)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def two_step_target(teacher_x0: XPredictor, scheduler, z_t: torch.Tensor, tau_t: torch.Tensor,
                    tau_mid: torch.Tensor, tau_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's two DDIM steps tau_t -> tau_mid -> tau_next from z_t, and the student's x-target.

    Returns (x_target, z_next), both (B, C, H, W); ``tau_*`` are (B,) times of ``scheduler``.
    """
    x1 = teacher_x0(z_t, tau_t)
    z_mid = scheduler.ddim_update(x1, z_t, tau_t, tau_mid)
    x2 = teacher_x0(z_mid, tau_mid)
    z_next = scheduler.ddim_update(x2, z_mid, tau_mid, tau_next)
    a_t, s_t = (_expand(v, z_t) for v in scheduler.alpha_sigma(tau_t))
    a_n, s_n = (_expand(v, z_t) for v in scheduler.alpha_sigma(tau_next))
    ratio = s_n / s_t
    x_target = (z_next - ratio * z_t) / (a_n - ratio * a_t)
    last = (s_n == 0).expand_as(x2)
    return torch.where(last, x2, x_target), z_next


def truncated_snr_weight(scheduler, tau: torch.Tensor) -> torch.Tensor:
    """max(SNR(tau), 1) per sample (B,): the x-error weight of Salimans & Ho ("truncated SNR")."""
    alpha, sigma = scheduler.alpha_sigma(tau)
    snr = alpha.double() ** 2 / (sigma.double() ** 2).clamp(min=1e-20)
    return snr.clamp(min=1.0, max=1e4).float()


def x_loss(scheduler, x_pred: torch.Tensor, x_target: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of max(SNR, 1) * ||x_pred - x_target||^2 (mean over pixels)."""
    per_sample = (x_pred.float() - x_target.float()).pow(2).flatten(1).mean(1)
    return (truncated_snr_weight(scheduler, tau).to(per_sample.device) * per_sample).mean()


def sample_student_times(scheduler, num_student_steps: int, batch: int, generator: torch.Generator):
    """Random student steps i in {1..N}: times (tau_t, tau_mid, tau_next), each (B,), on the teacher's 2N grid."""
    grid = scheduler.time_grid(2 * num_student_steps)  # (2N + 1,) descending, ends at -1
    i = torch.randint(1, num_student_steps + 1, (batch,), generator=generator)  # student step i: t = i / N
    top = 2 * (num_student_steps - i)  # index of t = i / N in the descending 2N grid
    return grid[top], grid[top + 1], grid[top + 2]


def guided_x0(x_uncond: torch.Tensor, x_cond: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in x-space: x_u + s (x_c - x_u) = (1 + w) x_c - w x_u with s = 1 + w."""
    return x_uncond + _expand(guidance_scale, x_cond) * (x_cond - x_uncond)
