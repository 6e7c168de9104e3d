"""Progressive distillation targets (Salimans & Ho 2022, Algorithm 2) and guidance folding (Meng et al. 2023).

``training/distill.py`` trains with them; the guided combination itself is ``ldm.guidance.combine``.

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

from .guidance import combine

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
    x_target = (z_next - ratio * z_t) / (a_n - ratio * a_t)  # = x2 exactly when sigma'' = 0
    return x_target, z_next


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
    i = torch.randint(1, num_student_steps + 1, (batch,), generator=generator, device=generator.device)  # t = i / N
    grid = grid.to(i.device)
    top = 2 * (num_student_steps - i)  # index of t = i / N in the descending 2N grid
    return grid[top], grid[top + 1], grid[top + 2]


def sample_fold_times(scheduler, num_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Guidance fold: random times (B,) on the teacher's own ``num_steps`` grid (the clean end excluded)."""
    grid = scheduler.time_grid(num_steps)[:-1]
    pick = torch.randint(0, len(grid), (batch,), generator=generator, device=generator.device)
    return grid.to(pick.device)[pick]


def guidance_fold_target(teacher_x0: Callable, z_t: torch.Tensor, tau: torch.Tensor, embeds: torch.Tensor,
                         mask: torch.Tensor, empty_embeds: torch.Tensor, empty_mask: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """The guided teacher's x at z_t (B, C, H, W): x_u + s (x_c - x_u) from one teacher batch of [uncond; cond].

    ``teacher_x0(z, tau, embeds, mask)`` -> x0_hat; ``scale`` (B,) is the guidance scale the student is given.
    """
    both = teacher_x0(torch.cat([z_t, z_t]), torch.cat([tau, tau]),
                      torch.cat([empty_embeds.expand_as(embeds).to(embeds.dtype), embeds]),
                      torch.cat([empty_mask.expand_as(mask), mask]))
    x_uncond, x_cond = both.chunk(2)
    return combine(x_uncond, x_cond, scale)
