"""One training step of a latent text-to-image diffusion model, all of it on one screen.

    batch --BatchEncoder--> x0 (B, C, h, w) in the denoiser's latent space, text tokens (B, L, D), mask (B, L)
                            (frozen VAE + text encoder on the fly, or a latent cache; ``ldm.latents``)
    eps ~ N(0, I) (+ noise offset), t ~ U{0, ..., T - 1} or a density, captions dropped with probability p
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) (eps + gamma xi)                        (``ldm.noise_schedules``)
      or x_s = (1 - s) x0 + s (eps + gamma xi), t = 1000 s                     (``ldm.flow_matching``)
      (gamma: input perturbation, 0 by default; xi ~ N(0, I); the target keeps eps)
    loss = w(t) |denoiser(x_t, t, text) - target(eps | x0 | v | eps - x0)|^2 (+ lambda L_vlb)   (``ldm.losses``)

Every random draw comes from the step's ``generator`` (on its device: the accelerator's, so nothing is drawn on the
host and copied each step), in a fixed order, so a resumed run repeats exactly the draws an uninterrupted one
makes. ``training/train_t2i.py`` and ``bench/bench_training.py`` call :func:`diffusion_step`; ``training/distill.py``
shares :class:`BatchEncoder` and :func:`draw_noise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flow_matching import add_flow_noise, sample_levels, shift_sigmas
from .guidance import drop_captions
from .latents import encode_posterior, sample_posterior, to_denoiser_space
from .losses import LossOutput, diffusion_loss


@dataclass
class Objective:
    """What a step trains: the forward process (a ``DDPMScheduler``, or for ``"flow"`` a
    ``FlowMatchEulerDiscreteScheduler`` whose config holds the shift), the target and its weighting."""

    scheduler: object
    prediction_type: str = "epsilon"  # epsilon | sample | v_prediction | flow
    snr_gamma: float | None = None  # min-SNR-gamma weighting; None = plain MSE
    learned_variance: bool = False  # hybrid L_simple + vlb_weight * L_vlb (improved DDPM)
    vlb_weight: float = 1e-3
    noise_offset: float = 0.0
    caption_dropout: float = 0.1  # probability of the empty caption (classifier-free guidance)
    weighting_scheme: str = "uniform"  # the density of the noise levels: uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    input_perturbation: float = 0.0  # gamma: x_t is built from eps + gamma xi, the target from eps (Ning et al. 2023)

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """u (n,) in [0, 1] from the weighting scheme's density (``ldm.flow_matching.sample_levels``)."""
        return sample_levels(n, self.weighting_scheme, generator, self.logit_mean, self.logit_std, self.mode_scale)


class BatchEncoder:
    """A data batch -> (x0 (B, C, h, w) in the denoiser's latent space, text tokens (B, L, D), mask (B, L)).

    Takes raw batches (``pixel_values``, ``captions``: runs the frozen VAE and text encoder) and cached ones
    (``latent_params``, ``prompt_embeds``, ``prompt_mask``). The random draws (flip, posterior sample) come from the
    step generator in the same order either way, so caching does not change what a run trains on. Also holds the
    empty caption's tokens (``empty_embeds`` (1, L, D), ``empty_mask`` (1, L)) for caption dropout.
    """

    def __init__(self, vae, text_encoder, tokenizer, random_flip: bool, latents_mode: str = "posterior"):
        from .data.latent_cache import encode_text

        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.random_flip, self.latents_mode = random_flip, latents_mode
        with torch.no_grad():
            self.empty_embeds, self.empty_mask = encode_text(tokenizer, text_encoder, [""])

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator):
        from .data.latent_cache import encode_text

        cached = "latent_params" in batch
        n = len(batch["latent_params"] if cached else batch["pixel_values"])
        flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 if self.random_flip else None
        if cached:
            params = batch["latent_params"]
            if flip is not None:
                params = torch.where(flip[:, None, None, None].to(params.device), batch["latent_params_flip"], params)
        else:
            pixels = batch["pixel_values"]
            if flip is not None:
                pixels = torch.where(flip[:, None, None, None].to(pixels.device), pixels.flip(-1), pixels)
            params = encode_posterior(self.vae, pixels)
        embeds, mask = self.encode_captions(batch, generator)
        # contiguous: the VAE returns channels-last latents, cached ones are not; the same memory format keeps the
        # denoiser's kernels, and so the weights, bitwise identical with and without the cache
        z = sample_posterior(params, self.latents_mode, generator)
        latents = to_denoiser_space(z, self.vae).contiguous()
        return latents, embeds, mask.to(latents.device)


    def encode_captions(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L, D) and mask (B, L) of each row's caption; rows with a list of captions get one drawn
        per step (one ``randint`` per row from ``generator``, the same draw for raw and cached batches)."""
        from .data.latent_cache import encode_ids, encode_text

        if "caption_ids" in batch:  # cached list captions: (B, K, L) token ids, unused rows -1
            ids = batch["caption_ids"]
            counts = (ids[:, :, 0] >= 0).sum(1)
            pick = torch.zeros_like(counts)
            if counts.max() > 1:  # as for raw batches: a draw only when some row has a choice
                pick = torch.randint(0, 1 << 30, (len(ids),), generator=generator, device=generator.device)
                pick = pick.to(counts.device) % counts
            return encode_ids(self.tokenizer, self.text_encoder, ids[torch.arange(len(ids), device=ids.device), pick])
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.text_encoder.dtype), batch["prompt_mask"].long()
        lists = batch.get("caption_lists")
        captions = batch["captions"]
        if lists is not None and max(map(len, lists)) > 1:
            pick = (torch.randint(0, 1 << 30, (len(lists),), generator=generator, device=generator.device).cpu() %
                    torch.tensor([len(o) for o in lists])).tolist()
            captions = [options[k] for options, k in zip(lists, pick)]
        return encode_text(self.tokenizer, self.text_encoder, captions)


def draw_noise(shape: torch.Size, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, I) of ``shape`` (B, C, h, w), plus ``noise_offset`` x a per-(sample, channel) constant if > 0."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if noise_offset:
        noise += noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=generator.device)
    return noise


def perturb_input(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """What x_t is built from: ``noise`` + gamma xi, xi ~ N(0, I) (input perturbation, DDPM-IP: the denoiser meets
    inputs a little off the forward process, as its own samples are, while its target stays ``noise``; the
    ``--input_perturbation`` of diffusers' training scripts). gamma = 0: ``noise`` itself, and nothing is drawn."""
    if not gamma:
        return noise
    return noise + gamma * draw_noise(noise.shape, 0.0, generator).to(noise.device)


def add_training_noise(objective: Objective, latents: torch.Tensor, noise: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (B, C, h, w) and the denoiser's time input (B,): DDPM's integer t (uniform: one ``randint``, else
    floor(u T)), or flow's x_s with t = T s, s the shifted level."""
    n, scheduler = latents.shape[0], objective.scheduler
    steps = scheduler.config.num_train_timesteps
    if objective.prediction_type == "flow":
        sigmas = shift_sigmas(objective.draw_levels(n, generator), scheduler.config.shift).to(latents.device)
        return add_flow_noise(latents, noise, sigmas), sigmas * steps
    if objective.weighting_scheme == "uniform":
        timesteps = torch.randint(0, steps, (n,), generator=generator, device=generator.device)
    else:
        timesteps = (objective.draw_levels(n, generator) * steps).long().clamp(max=steps - 1)
    timesteps = timesteps.to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), timesteps


def diffusion_step(denoiser, encoder: BatchEncoder, objective: Objective, batch: dict,
                   generator: torch.Generator) -> LossOutput:
    """The loss of one micro-batch (backward, clipping and the optimizer are ``ldm.train_loop``'s)."""
    latents, embeds, mask = encoder(batch, generator)  # x0 (B, C, h, w), (B, L, D), (B, L)
    noise = draw_noise(latents.shape, objective.noise_offset, generator).to(latents.device)
    perturbed = perturb_input(noise, objective.input_perturbation, generator)  # eps + gamma xi (eps if gamma = 0)
    noisy, timesteps = add_training_noise(objective, latents, perturbed, generator)  # x_t, t (B,)
    embeds, mask = drop_captions(embeds, mask, encoder.empty_embeds, encoder.empty_mask, objective.caption_dropout,
                                 generator)
    output = denoiser(noisy, timesteps, embeds, encoder_attention_mask=mask).sample
    loss = diffusion_loss(objective.scheduler, output, latents, noise, noisy, timesteps, objective.prediction_type,
                          objective.snr_gamma, objective.learned_variance, objective.vlb_weight)
    loss.levels = timesteps.float() / objective.scheduler.config.num_train_timesteps
    return loss
