"""Sampler of a progressively distilled student (Salimans & Ho 2022): deterministic DDIM on a fixed time grid.

Time runs continuously over u in [0, 1]; u = 1 is the top of the schedule (pure noise with a zero-terminal-SNR
schedule) and u = 0 is the clean image. A student of N steps jumps u = k/N -> (k-1)/N. The denoiser sees the matching
discrete timestep tau(u) = u * T - 1 (T = ``num_train_timesteps``), so tau = T - 1 at the top and tau = -1 means
"clean"; alpha-bar is interpolated linearly between the integer timesteps when tau is fractional. Halving N keeps
every grid point, which is what makes progressive distillation exact.

Update from tau to tau' (DDIM, eta = 0), with alpha = sqrt(alpha-bar), sigma = sqrt(1 - alpha-bar):

    x0_hat = prediction -> x0   (epsilon, sample or v_prediction)
    z'     = alpha' x0_hat + (sigma' / sigma) (z - alpha x0_hat)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..losses import PREDICTION_TYPES, x0_from_prediction
from ..noise_schedules import BETA_SCHEDULES

logger = logging.getLogger(__name__)


@dataclass
class ProgressiveDistillationSchedulerOutput(BaseOutput):
    """``prev_sample`` z at the next (lower) grid time and ``pred_original_sample`` x0_hat, both (B, C, H, W)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ProgressiveDistillationScheduler(SchedulerMixin, ConfigMixin):
    r"""Deterministic few-step sampler for progressively distilled students.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the forward
            process of the teacher (as in diffusers' DDPM/DDIM schedulers).
        prediction_type: what the denoiser predicts: "v_prediction" (students are trained so), "sample" or "epsilon".
        num_distilled_steps: N, the step count the student was distilled for (the default of ``set_timesteps``).
        teacher_steps: the step count of the teacher grid it was distilled from (2N), for the record.
        distillation_round: how many halvings produced this student (0 = not distilled).
        guidance_scale: for students with classifier-free guidance folded in, the guidance scale to sample with by
            default (``None`` for plain students).
        guidance_scale_range: [low, high], the guidance scales the fold trained on (``LatentPipeline`` warns when a
            call asks for a scale outside it: the guidance embedding never saw one); ``None`` when not recorded.
        timestep_spacing, clip_sample: unused here; recorded so that diffusers' DDIM ``from_config`` samples the same
            grid ("trailing") without clipping x0.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = True,
        prediction_type: str = "v_prediction",
        num_distilled_steps: int = 64,
        teacher_steps: int | None = None,
        distillation_round: int = 0,
        guidance_scale: float | None = None,
        guidance_scale_range: list[float] | None = None,
        timestep_spacing: str = "trailing",
        clip_sample: bool = False,
    ):
        if trained_betas is None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            raise ValueError("An epsilon prediction cannot give x0 from pure noise (zero terminal SNR); "
                             "use v_prediction or sample.")
        if guidance_scale_range is not None and not (len(guidance_scale_range) == 2
                                                     and guidance_scale_range[0] <= guidance_scale_range[1]):
            raise ValueError(f"guidance_scale_range must be [low, high] with low <= high, got {guidance_scale_range}")
        # the forward process is diffusers' own, so alpha-bar is exactly the table the teacher trained with
        forward = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                beta_schedule=beta_schedule, trained_betas=trained_betas,
                                rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.betas, self.alphas_cumprod = forward.betas, forward.alphas_cumprod
        # alpha-bar at tau = -1 (clean), 0, ..., T - 1, indexed by tau + 1.
        self._alpha_bar_ext = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod.double()])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = self.time_grid(num_distilled_steps)[:-1]

    # ---------------------------------------------------------------- schedule
    def time_grid(self, num_steps: int) -> torch.Tensor:
        """(N + 1,) descending discrete times tau(k / N) = k T / N - 1, k = N .. 0 (the last is -1 = clean)."""
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        u = torch.arange(num_steps, -1, -1, dtype=torch.float64) / num_steps
        return (u * self.config.num_train_timesteps - 1.0).float()

    def alpha_sigma(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha-bar) and sqrt(1 - alpha-bar) at (possibly fractional) discrete times tau in [-1, T - 1]."""
        tau = torch.as_tensor(timestep, dtype=torch.float64).cpu()
        pos = (tau + 1.0).clamp(0, self.config.num_train_timesteps)
        lo = pos.floor().long().clamp(max=self.config.num_train_timesteps - 1)
        frac = pos - lo
        table = self._alpha_bar_ext
        alpha_bar = (table[lo] * (1 - frac) + table[(lo + 1).clamp(max=len(table) - 1)] * frac).clamp(0.0, 1.0)
        return alpha_bar.sqrt().float(), (1.0 - alpha_bar).sqrt().float()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Sample on the N-step grid (default: the step count this student was distilled for)."""
        distilled = self.config.num_distilled_steps
        num_inference_steps = num_inference_steps or distilled
        if num_inference_steps != distilled:
            logger.warning(
                "This scheduler belongs to a model distilled for %d steps; sampling with %d steps gives worse images. "
                "Use num_inference_steps=%d, or the teacher for more steps.", distilled, num_inference_steps,
                distilled,
            )
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.time_grid(num_inference_steps)[:-1].to(device)

    def previous_timestep(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """The next lower grid time after ``timestep`` (-1 after the last step)."""
        grid = self.time_grid(self.num_inference_steps or self.config.num_distilled_steps)
        idx = int(torch.argmin((grid - float(timestep)).abs()))
        if abs(float(grid[idx]) - float(timestep)) > 1e-3 or idx == len(grid) - 1:
            raise ValueError(f"timestep {float(timestep)} is not on this scheduler's {len(grid) - 1}-step grid")
        return grid[idx + 1]

    # ---------------------------------------------------------------- model outputs
    def predict_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """x0_hat (B, C, H, W) from the denoiser output at time ``timestep`` (scalar or (B,))."""
        alpha, sigma = (v.to(sample.device, sample.dtype) for v in self.alpha_sigma(timestep))
        alpha, sigma = alpha.reshape(-1, *[1] * (sample.ndim - 1)), sigma.reshape(-1, *[1] * (sample.ndim - 1))
        return x0_from_prediction(model_output, sample, alpha, sigma, self.config.prediction_type)

    def ddim_update(self, x0: torch.Tensor, sample: torch.Tensor, timestep, prev_timestep) -> torch.Tensor:
        """z' = alpha' x0 + (sigma' / sigma)(z - alpha x0): the deterministic DDIM move from tau to tau'."""
        shape = (-1, *[1] * (sample.ndim - 1))
        a, s = (v.to(sample.device, sample.dtype).reshape(shape) for v in self.alpha_sigma(timestep))
        a2, s2 = (v.to(sample.device, sample.dtype).reshape(shape) for v in self.alpha_sigma(prev_timestep))
        return a2 * x0 + (s2 / s) * (sample - a * x0)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
    ) -> ProgressiveDistillationSchedulerOutput | tuple:
        """One deterministic step from ``timestep`` to the next grid time."""
        prev = self.previous_timestep(timestep)
        x0 = self.predict_x0(model_output, timestep, sample)
        prev_sample = self.ddim_update(x0, sample, timestep, prev)
        if not return_dict:
            return (prev_sample, x0)
        return ProgressiveDistillationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # ---------------------------------------------------------------- training helpers
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_tau = alpha x0 + sigma eps for (B,) possibly fractional ``timesteps``."""
        shape = (-1, *[1] * (original_samples.ndim - 1))
        a, s = (v.to(original_samples.device, original_samples.dtype).reshape(shape)
                for v in self.alpha_sigma(timesteps))
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = alpha eps - sigma x0."""
        shape = (-1, *[1] * (sample.ndim - 1))
        a, s = (v.to(sample.device, sample.dtype).reshape(shape) for v in self.alpha_sigma(timesteps))
        return a * noise - s * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
