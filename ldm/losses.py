"""Diffusion training losses: prediction targets, min-SNR-gamma weighting, and improved DDPM's hybrid loss.

Notation (per sample, with a_t = alphas_cumprod[t]):  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  SNR(t) = a_t / (1 - a_t).

* targets: ``epsilon`` -> eps, ``sample`` -> x0, ``v_prediction`` -> v = sqrt(a_t) eps - sqrt(1 - a_t) x0; ``flow``
  -> eps - x0, the velocity of the flow-matching path x_s = (1 - s) x0 + s eps (``ldm.flow_matching``).
* min-SNR-gamma (Hang et al. 2023): per-sample MSE weight min(SNR, gamma) / SNR (epsilon),
  min(SNR, gamma) / (SNR + 1) (v), min(SNR, gamma) (x0) -- all equal to min(SNR, gamma) on the x0 error.
* hybrid loss (Nichol & Dhariwal 2021): L_simple + lambda * L_vlb, where the model also outputs v in [-1, 1]
  interpolating log-variances, log sigma^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (diffusers'
  ``variance_type="learned_range"``). L_vlb is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension
  (the decoder NLL at t = 0) with the stop-gradient on the mean, so it only trains the variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """Regression target (B, C, H, W) for clean ``latents``, ``noise`` and ``timesteps`` (B,)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "flow":
        return noise - latents
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample MSE weights (B,) of min-SNR-gamma for the given prediction type (1 where SNR is 0)."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = clipped
    return torch.where(snr > 0, weights, torch.ones_like(weights))  # zero-terminal-SNR: no division by 0


def _gather(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """values (T,) indexed by timesteps (B,) -> (B, 1, 1, 1)."""
    return values.to(timesteps.device)[timesteps].float()[:, None, None, None]


def x0_from_prediction(model_pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """x0 implied by a model prediction (B, C, H, W) at x_t = alpha x0 + sigma eps (alpha, sigma broadcastable).

    The one definition of the parameterisations' inverse: eps -> (x_t - sigma eps) / alpha, x0 -> itself,
    v = alpha eps - sigma x0 -> alpha x_t - sigma v; flow (alpha = 1 - s, sigma = s) u = eps - x0 -> x_t - sigma u.
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_pred) / alpha
    if prediction_type == "sample":
        return model_pred
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_pred
    if prediction_type == "flow":
        return x_t - sigma * model_pred
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predicted_x0(scheduler, model_pred: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """x0 implied by a model prediction (B, C, H, W) at integer ``timesteps`` of a DDPM ``scheduler``."""
    a = _gather(scheduler.alphas_cumprod, timesteps)
    return x0_from_prediction(model_pred, x_t, a.sqrt(), (1 - a).sqrt(), prediction_type)


def _alphas(scheduler, timesteps: torch.Tensor):
    """a_t, a_{t-1} (1 at t = 0), beta_t = 1 - a_t / a_{t-1} and the clipped posterior log-variance, each (B, 1, 1, 1).

    The posterior variance beta~_t = (1 - a_{t-1}) / (1 - a_t) beta_t is 0 at t = 0; as in improved DDPM its log is
    clipped to log beta~_1 there (diffusers' sampler adds no noise at t = 0, so this only keeps the loss finite).
    """
    a_all = scheduler.alphas_cumprod.to(timesteps.device).float()
    a_prev_all = torch.cat([torch.ones_like(a_all[:1]), a_all[:-1]])
    var_all = (1 - a_prev_all) / (1 - a_all) * (1 - a_all / a_prev_all)
    log_var_all = torch.log(torch.cat([var_all[1:2], var_all[1:]]))
    a, ap, log_var = _gather(a_all, timesteps), _gather(a_prev_all, timesteps), _gather(log_var_all, timesteps)
    return a, ap, 1 - a / ap, log_var


def posterior(scheduler, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
    """Mean (B, C, H, W) and clipped log-variance (B, 1, 1, 1) of q(x_{t-1} | x_t, x0)."""
    a, ap, beta, log_var = _alphas(scheduler, timesteps)
    mean = (ap.sqrt() * beta / (1 - a)) * x0 + ((1 - ap) * (a / ap).sqrt() / (1 - a)) * x_t
    return mean, log_var


def learned_range_log_variance(scheduler, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Model log-variance (B, C, H, W) from the raw variance output v, as diffusers' ``learned_range`` samples it."""
    _, _, beta, min_log = _alphas(scheduler, timesteps)
    frac = (v + 1) / 2
    return frac * torch.log(beta) + (1 - frac) * min_log


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vlb_terms(scheduler, model_pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
              timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample VLB term L_{t-1} (B,) in bits/dim; the mean comes from ``model_pred`` (detach it for stop-grad).

    t > 0: KL(q(x_{t-1}|x_t, x0) || N(mu_theta, sigma_theta^2)); t = 0: -log N(x0; mu_theta, sigma_theta^2).
    """
    true_mean, true_logvar = posterior(scheduler, x0, x_t, timesteps)
    x0_hat = predicted_x0(scheduler, model_pred, x_t, timesteps, prediction_type)
    model_mean, _ = posterior(scheduler, x0_hat, x_t, timesteps)
    model_logvar = learned_range_log_variance(scheduler, v, timesteps)
    kl = _normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = 0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - model_mean) ** 2 * torch.exp(-model_logvar))
    nll = nll.flatten(1).mean(1) / math.log(2.0)
    return torch.where(timesteps == 0, nll, kl)


@dataclass
class LossOutput:
    """``loss`` (scalar to backpropagate) and its parts for logging."""

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor | None = None
    per_sample: torch.Tensor | None = None  # (B,) detached weighted MSE (the validation loss' per-timestep buckets)
    levels: torch.Tensor | None = None  # (B,) noise levels in [0, 1] (t / T, or flow's s), set by the training step

    def logs(self) -> dict[str, float]:
        logs = {"mse": self.mse.item()}
        if self.vlb is not None:
            logs["vlb"] = self.vlb.item()
        return logs


def diffusion_loss(
    scheduler,
    model_output: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    learned_variance: bool = False,
    vlb_weight: float = 1e-3,
) -> LossOutput:
    """Training loss for one batch.

    Args:
        scheduler: the training noise scheduler (``DDPMScheduler``; gives ``alphas_cumprod``).
        model_output: denoiser output (B, C, H, W), or (B, 2C, H, W) ``[prediction, v]`` with ``learned_variance``.
        latents, noise, noisy_latents: x0, eps and x_t (B, C, H, W).
        timesteps: (B,) integer timesteps.
        prediction_type: "epsilon", "sample", "v_prediction" or "flow" (then ``scheduler`` is unused).
        snr_gamma: min-SNR-gamma weighting of the MSE (None = plain mean).
        learned_variance: add lambda * L_vlb with the stop-gradient on the mean (improved DDPM's hybrid loss).
        vlb_weight: lambda (1e-3 in the paper), applied to L_vlb scaled by T / 1000 as there.
    """
    channels = latents.shape[1]
    pred = model_output[:, :channels].float()
    target = prediction_target(scheduler, latents, noise, timesteps, prediction_type).float()
    per_sample = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma, prediction_type)
    mse = per_sample.mean()
    if not learned_variance:
        return LossOutput(loss=mse, mse=mse.detach(), per_sample=per_sample.detach())
    if model_output.shape[1] != 2 * channels:
        raise ValueError("learned_variance needs a denoiser built with learned_sigma=True (2x output channels).")
    v = model_output[:, channels:].float()
    vlb = vlb_terms(scheduler, pred.detach(), v, latents.float(), noisy_latents.float(), timesteps, prediction_type)
    vlb = vlb.mean() * scheduler.config.num_train_timesteps / 1000.0
    return LossOutput(loss=mse + vlb_weight * vlb, mse=mse.detach(), vlb=vlb.detach(), per_sample=per_sample.detach())
