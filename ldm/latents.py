"""Latent space: between pixels and the latents a denoiser sees, in one place.

    image (B, 3, H, W) in [-1, 1] --vae.encode--> posterior parameters (B, 2C, h, w) = [mean, logvar], h = H / f
    z = mean + exp(logvar / 2) * eps  (a posterior draw; or the mean)
    latents = (z - shift) * scale                    the denoiser's space: about unit variance
    z = latents / scale + shift --vae.decode--> image (the exact inverse of the line above)

``f`` is the VAE factor ``2 ** (len(block_out_channels) - 1)``; ``scale`` is ``vae.config.scaling_factor`` (1 / std
of the latents, set by ``training/train_vae.py``) and ``shift`` the optional ``shift_factor`` (0 when absent).
"""

from __future__ import annotations

from typing import Sequence

import torch


def vae_scale_factor(vae_or_block_out_channels) -> int:
    """The VAE's spatial down-sampling factor f (one halving per level but the last), from a VAE, its config or its
    ``block_out_channels``."""
    channels = vae_or_block_out_channels
    if not isinstance(channels, Sequence):
        config = getattr(channels, "config", channels)
        channels = config.block_out_channels if hasattr(config, "block_out_channels") else config["block_out_channels"]
    return 2 ** (len(channels) - 1)


def _scale_shift(vae) -> tuple[float, float | None]:
    config = getattr(vae, "config", vae)
    return config.scaling_factor, getattr(config, "shift_factor", None)


def encode_posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, H, W) in [-1, 1] -> the VAE posterior's parameters (B, 2C, H / f, W / f) = [mean, logvar]."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_posterior(params: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Posterior parameters (B, 2C, h, w) = [mean, logvar] -> unscaled latents z (B, C, h, w) in float32.

    ``mode="mean"`` returns the mean; ``"posterior"`` draws mean + std * eps with ``generator`` (on its device), the
    same draw whether the parameters come from a latent cache or from the VAE on the fly.
    """
    mean, logvar = params.float().chunk(2, dim=1)
    if mode == "mean":
        return mean
    if mode != "posterior":
        raise ValueError(f"latents mode must be 'posterior' or 'mean', got {mode!r}")
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)


def to_denoiser_space(z: torch.Tensor, vae) -> torch.Tensor:
    """Unscaled VAE latents z -> the denoiser's latents (z - shift) * scale (``vae``: the VAE or its config)."""
    scale, shift = _scale_shift(vae)
    return (z - (shift or 0.0)) * scale


def from_denoiser_space(latents: torch.Tensor, vae) -> torch.Tensor:
    """The exact inverse of :func:`to_denoiser_space`: latents / scale + shift, ready for ``vae.decode``."""
    scale, shift = _scale_shift(vae)
    z = latents / scale
    return z + shift if shift is not None else z


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents (B, C, h, w) -> images (B, 3, h * f, w * f) in about [-1, 1]."""
    return vae.decode(from_denoiser_space(latents, vae).to(vae.dtype), return_dict=False)[0]
