"""Classifier-free guidance (Ho & Salimans 2022) and guidance distillation (Meng et al. 2023), in one place.

Training drops each caption with probability p (:func:`drop_captions`: the empty caption's tokens replace it), so
one denoiser learns both the conditional prediction c and the unconditional one u. Sampling combines them
(:func:`combine`):

    pred = u + s (c - u)            s = guidance_scale; s = 1 is the conditional model, s <= 1 disables guidance

in the space the model predicts (eps, x0 or v: the combination is linear, so all agree for a fixed x_t). Guidance
folding trains a student that takes s as an input to match the guided teacher (:func:`combine` of its two branches
in x-space is the target); training draws s uniformly from a range (:func:`sample_scales`), and the student embeds
s like a timestep scaled by :data:`EMBEDDING_SCALE` (:func:`embedding_input`) so s ~ 1..15 spans the sinusoid's
frequencies.
"""

from __future__ import annotations

import torch

#: A guidance scale s enters the sinusoidal embedding as s * EMBEDDING_SCALE (as timesteps 0..999 do).
EMBEDDING_SCALE = 1000.0


def drop_captions(embeds: torch.Tensor, mask: torch.Tensor, empty_embeds: torch.Tensor, empty_mask: torch.Tensor,
                  probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption (B, L, D) / mask (B, L) by the empty caption's (1, L, D) / (1, L) with ``probability``.

    One ``torch.rand(B)`` draw from ``generator`` decides, whatever the probability (so runs stay comparable).
    """
    drop = (torch.rand(embeds.shape[0], generator=generator, device=generator.device) < probability).to(embeds.device)
    embeds = torch.where(drop[:, None, None], empty_embeds.to(embeds.device, embeds.dtype), embeds)
    mask = torch.where(drop[:, None], empty_mask.to(mask.device), mask)
    return embeds, mask


def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """u + s (c - u) for predictions (B, ...); ``scale`` is a number or one per sample (B,)."""
    if torch.is_tensor(scale):
        scale = scale.to(cond.device, cond.dtype).reshape(-1, *[1] * (cond.ndim - 1))
    return uncond + scale * (cond - uncond)


def sample_scales(low: float, high: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Guidance scales (B,) drawn uniformly from [low, high): the range a guidance-folded student learns."""
    return low + (high - low) * torch.rand(batch, generator=generator, device=generator.device)


def embedding_input(scale: torch.Tensor) -> torch.Tensor:
    """Guidance scales (B,) -> the values the guidance embedding's sinusoid sees."""
    return scale.float() * EMBEDDING_SCALE
