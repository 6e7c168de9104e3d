"""Pieces shared by the U-Net and DiT denoisers.

Both denoisers take the same arguments and return a :class:`DenoiserOutput`:

    sample                 (B, C, H, W)   noisy latents x_t
    timestep               (B,) or ()     integer or float diffusion timesteps
    encoder_hidden_states  (B, L, D_txt)  text-encoder tokens (cross-attention context)
    encoder_attention_mask (B, L)         1 = attend, 0 = ignore (padding); optional
    guidance               (B,) or ()     guidance weight w, only for guidance-distilled students
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of a denoiser: ``sample`` (B, C_out, H, W), the model prediction
    (epsilon, x0 or v; with learned sigma the second half of the channels is the variance interpolation)."""

    sample: torch.Tensor


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) keep-mask of 1/0 (or bool) -> (B, 1, L) additive attention bias (0 keep, -10000 drop).

    A tensor that is already a float bias with 3 dims is returned as is (cast to ``dtype``).
    """
    if mask is None:
        return None
    if mask.ndim == 3:
        return mask.to(dtype)
    if mask.ndim != 2:
        raise ValueError(f"encoder_attention_mask must have shape (batch, tokens), got {tuple(mask.shape)}")
    return ((1.0 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def broadcast_timestep(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """Scalar, 0-d or (B,) timesteps -> (B,) tensor on ``device``."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(device)
    else:
        timestep = timestep.to(device)
    if timestep.shape[0] not in (1, batch):
        raise ValueError(f"timestep has {timestep.shape[0]} entries but the batch has {batch} samples")
    return timestep.expand(batch)


class ConditionEmbedding(nn.Module):
    """Sinusoidal timestep (and optional guidance-weight) embedding -> (B, dim).

    The guidance branch embeds w like a timestep (scaled by 1000 so w ~ 1..15 spans the sinusoid
    frequencies); it is used by guidance-distilled students (Meng et al. 2023).
    """

    def __init__(self, freq_dim: int, dim: int, guidance_embedding: bool = False):
        super().__init__()
        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(freq_dim, dim)
        if guidance_embedding:
            self.guidance_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.guidance_embedding = TimestepEmbedding(freq_dim, dim)
        else:
            self.guidance_embedding = None

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embedding(self.time_proj(timestep).to(dtype))
        if self.guidance_embedding is not None:
            if guidance is None:
                raise ValueError(
                    "This denoiser was distilled with classifier-free guidance folded in (guidance_embedding=True): "
                    "pass `guidance` (the guidance weight w, shape (batch,))."
                )
            guidance = broadcast_timestep(guidance, timestep.shape[0], timestep.device).float()
            emb = emb + self.guidance_embedding(self.guidance_proj(guidance * 1000.0).to(dtype))
        return emb
