"""Flow matching (``ldm.flow_matching``): the path and its target in closed form, the training noise levels against
diffusers' density helper and its scheduler's shift, and the pipeline sampling a flow model with the saved
scheduler (an exact velocity field reaches its data point; the flow-trained tiny models are in test_training)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.training_utils import compute_density_for_timestep_sampling

from ldm.flow_matching import add_flow_noise, flow_scheduler, resolution_shift, shift_sigmas
from ldm.losses import diffusion_loss, prediction_target, x0_from_prediction
from ldm.tiny import tiny_components
from ldm.training_step import Objective, add_training_noise
from pipelines import LatentPipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_path_its_velocity_and_the_x0_it_implies_in_closed_form():
    x0, eps = torch.randn(4, 4, 8, 8, generator=gen(0)), torch.randn(4, 4, 8, 8, generator=gen(1))
    s = torch.tensor([0.0, 0.25, 0.6, 1.0])
    x_s = add_flow_noise(x0, eps, s)
    torch.testing.assert_close(x_s[0], x0[0])
    torch.testing.assert_close(x_s[3], eps[3])
    torch.testing.assert_close(x_s[1], 0.75 * x0[1] + 0.25 * eps[1])
    target = prediction_target(None, x0, eps, None, "flow")
    h = 1e-2  # the path is linear in s: the central difference is its derivative exactly (up to rounding)
    derivative = (add_flow_noise(x0, eps, s + h) - add_flow_noise(x0, eps, s - h)) / (2 * h)
    torch.testing.assert_close(derivative, target, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target, eps - x0)
    shape = (-1, 1, 1, 1)
    torch.testing.assert_close(x0_from_prediction(target, x_s, (1 - s).view(shape), s.view(shape), "flow"), x0,
                               atol=1e-5, rtol=1e-5)
    loss = diffusion_loss(None, target, x0, eps, x_s, 1000 * s, "flow")
    assert loss.loss.item() == 0.0


@pytest.mark.parametrize("scheme, kwargs", [("logit_normal", dict(logit_mean=0.5, logit_std=0.8)),
                                            ("mode", dict(mode_scale=1.29)), ("uniform", {})])
def test_training_levels_are_diffusers_density_shifted_as_the_scheduler_shifts(scheme, kwargs):
    objective = Objective(flow_scheduler(shift=3.0), "flow", weighting_scheme=scheme, **kwargs)
    u = objective.draw_levels(20000, gen(0))
    reference = compute_density_for_timestep_sampling(scheme, 20000, kwargs.get("logit_mean"),
                                                      kwargs.get("logit_std"), kwargs.get("mode_scale"),
                                                      generator=gen(0))
    torch.testing.assert_close(u, reference, rtol=0, atol=0)
    if scheme == "logit_normal":  # the density itself: logit(u) ~ N(0.5, 0.8)
        z = torch.logit(u.double())
        assert abs(z.mean().item() - 0.5) < 0.03 and abs(z.std().item() - 0.8) < 0.03
    if scheme == "uniform":
        counts = torch.histc(u, bins=10, min=0, max=1)
        assert (counts - 2000).abs().max() < 200
    # the training shift is the scheduler's: shifting its unshifted sigmas gives its shifted ones
    torch.testing.assert_close(shift_sigmas(flow_scheduler(shift=1.0).sigmas, 3.0), flow_scheduler(shift=3.0).sigmas)
    x0, eps = torch.randn(8, 4, 8, 8, generator=gen(1)), torch.randn(8, 4, 8, 8, generator=gen(2))
    noisy, t = add_training_noise(objective, x0, eps, gen(3))
    s = shift_sigmas(objective.draw_levels(8, gen(3)), 3.0)
    torch.testing.assert_close(t, 1000 * s)
    torch.testing.assert_close(noisy, add_flow_noise(x0, eps, s))


def test_a_density_also_draws_the_ddpm_timesteps_and_uniform_keeps_the_classic_draw():
    from ldm.noise_schedules import training_scheduler

    x0, eps = torch.randn(64, 4, 4, 4), torch.randn(64, 4, 4, 4)
    uniform = Objective(training_scheduler(), "epsilon")
    _, t = add_training_noise(uniform, x0, eps, gen(5))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=gen(5)))
    logit = Objective(training_scheduler(), "epsilon", weighting_scheme="logit_normal")
    _, t = add_training_noise(logit, x0, eps, gen(5))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert torch.equal(t, (logit.draw_levels(64, gen(5)) * 1000).long())


def test_resolution_shift_is_sd3s_rule():
    assert resolution_shift(256, 256) == 1.0
    assert resolution_shift(1024, 1024) == 4.0
    assert math.isclose(resolution_shift(64, 64), 0.25)
    with pytest.raises(ValueError, match="positive"):
        flow_scheduler(shift=0.0)


class PointFlow(ModelMixin, ConfigMixin):
    """The exact velocity field of a one-point data distribution x0 = c: v(x_s, s) = (x_s - c) / s, with the
    pipeline's time input t = 1000 s. Euler steps on it are exact, so sampling must end on c."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, cross_attention_dim: int = 32):
        super().__init__()
        self.c = torch.nn.Parameter(torch.linspace(-1, 1, in_channels * sample_size ** 2).view(
            1, in_channels, sample_size, sample_size))

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None,
                cross_attention_kwargs=None, return_dict=True):
        s = (timestep.float() / 1000).view(-1, 1, 1, 1)
        velocity = (sample - self.c) / s
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)


@pytest.mark.parametrize("scheduler_class, shift", [(FlowMatchEulerDiscreteScheduler, 1.0),
                                                     (FlowMatchEulerDiscreteScheduler, 3.0),
                                                     (FlowMatchHeunDiscreteScheduler, 3.0)])
def test_the_pipeline_samples_a_flow_model_with_flow_schedulers(scheduler_class, shift):
    parts = tiny_components("unet")
    parts["denoiser"], parts["scheduler"] = PointFlow(), flow_scheduler(shift=shift)
    pipe = LatentPipeline(**parts)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a red fox", num_inference_steps=6, guidance_scale=3.0, height=64, width=64,
                   generator=gen(0), output_type="latent").images
    torch.testing.assert_close(latents, pipe.denoiser.c.detach().expand_as(latents), atol=1e-4, rtol=1e-4)
