"""``ldm.losses`` against hand-written formulas and diffusers: targets, min-SNR-gamma, the learned-range VLB."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import compute_snr

from ldm.losses import (
    diffusion_loss, learned_range_log_variance, min_snr_weights, predicted_x0, prediction_target, vlb_terms,
)
from ldm.noise_schedules import training_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")

TIMESTEPS = torch.tensor([0, 1, 2, 10, 250, 500, 998, 999])
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


@pytest.fixture(scope="module")
def batch():
    """x0, noise (8, 4, 4, 4), a fixed generator's draws."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(TIMESTEPS), 4, 4, 4, generator=g), torch.randn(len(TIMESTEPS), 4, 4, 4, generator=g)


def _a(scheduler, t=TIMESTEPS):
    return scheduler.alphas_cumprod[t].float()[:, None, None, None]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_targets_and_predicted_x0(batch, prediction_type):
    x0, noise = batch
    scheduler = training_scheduler(prediction_type=prediction_type)
    a = _a(scheduler)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}
    target = prediction_target(scheduler, x0, noise, TIMESTEPS, prediction_type)
    torch.testing.assert_close(target, expected[prediction_type])

    # the exact prediction recovers x0 (epsilon at t=999 divides by sqrt(a) ~ 6e-3: looser there)
    x_t = scheduler.add_noise(x0, noise, TIMESTEPS)
    torch.testing.assert_close(predicted_x0(scheduler, target, x_t, TIMESTEPS, prediction_type), x0,
                               rtol=1e-3, atol=1e-3)
    # and equals diffusers' pred_original_sample for any model output
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ours = predicted_x0(scheduler, output, x_t, TIMESTEPS, prediction_type)
    for i, t in enumerate(TIMESTEPS.tolist()):
        theirs = scheduler.step(output[i:i + 1], t, x_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i:i + 1], theirs, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_is_refused(batch):
    x0, noise = batch
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        prediction_target(training_scheduler(), x0, noise, TIMESTEPS, "x0")


def _diffusers_min_snr(scheduler, timesteps, gamma, prediction_type):
    """The weights of diffusers' examples/text_to_image/train_text_to_image.py."""
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    return weights


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_equal_diffusers(prediction_type):
    scheduler = training_scheduler(prediction_type=prediction_type)
    weights = min_snr_weights(scheduler, TIMESTEPS, 5.0, prediction_type)
    torch.testing.assert_close(weights, _diffusers_min_snr(scheduler, TIMESTEPS, 5.0, prediction_type))
    snr = compute_snr(scheduler, TIMESTEPS)
    assert (weights[snr > 5] < 1).all() if prediction_type != "sample" else (weights <= 5).all()


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_min_snr_weights_are_finite_with_zero_terminal_snr(prediction_type):
    scheduler = training_scheduler(prediction_type=prediction_type, rescale_betas_zero_snr=True)
    snr = compute_snr(scheduler, TIMESTEPS)
    assert snr[-1] == 0  # t = 999
    weights = min_snr_weights(scheduler, TIMESTEPS, 5.0, prediction_type)
    assert torch.isfinite(weights).all() and weights[-1] == 1  # the terminal step still trains
    torch.testing.assert_close(weights[:-1], _diffusers_min_snr(scheduler, TIMESTEPS, 5.0, prediction_type)[:-1])
    output = torch.zeros(len(TIMESTEPS), 4, 4, 4)
    x0 = torch.ones_like(output)
    loss = diffusion_loss(scheduler, output, x0, x0, scheduler.add_noise(x0, x0, TIMESTEPS), TIMESTEPS,
                          prediction_type, snr_gamma=5.0)
    assert torch.isfinite(loss.loss)


def test_min_snr_loss_is_the_weighted_mean(batch):
    x0, noise = batch
    scheduler = training_scheduler(prediction_type="v_prediction")
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = scheduler.add_noise(x0, noise, TIMESTEPS)
    loss = diffusion_loss(scheduler, output, x0, noise, x_t, TIMESTEPS, "v_prediction", snr_gamma=5.0)
    per_sample = ((output - scheduler.get_velocity(x0, noise, TIMESTEPS)) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * _diffusers_min_snr(scheduler, TIMESTEPS, 5.0, "v_prediction")).mean()
    torch.testing.assert_close(loss.loss, expected)
    assert loss.vlb is None and loss.logs().keys() == {"mse"}


# ---------------------------------------------------------------------------------------------------- learned variance
@pytest.fixture(scope="module")
def learned():
    return training_scheduler(prediction_type="epsilon", learned_variance=True)


def test_learned_range_log_variance_equals_diffusers(learned):
    assert learned.config.variance_type == "learned_range"
    v = torch.rand(len(TIMESTEPS), 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = learned_range_log_variance(learned, v, TIMESTEPS)
    for i, t in enumerate(TIMESTEPS.tolist()):
        if t >= 1:
            torch.testing.assert_close(ours[i], learned._get_variance(t, predicted_variance=v[i]), rtol=1e-5,
                                       atol=1e-5)
    # v = -1: the posterior variance beta~_t; v = 1: beta_t
    ones = torch.ones(len(TIMESTEPS), 1, 1, 1)
    betas = learned.betas[TIMESTEPS].float()
    torch.testing.assert_close(learned_range_log_variance(learned, ones, TIMESTEPS).flatten(), betas.log(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_vlb_is_zero_for_the_true_posterior_and_positive_otherwise(batch, prediction_type):
    x0, noise = batch
    scheduler = training_scheduler(prediction_type=prediction_type, learned_variance=True)
    x_t = scheduler.add_noise(x0, noise, TIMESTEPS)
    exact = prediction_target(scheduler, x0, noise, TIMESTEPS, prediction_type)
    posterior_v = -torch.ones_like(x0)  # learned range at v = -1: the true posterior variance
    t_pos = TIMESTEPS > 0
    # where beta_t and beta~_t differ enough for float32 to see a KL (at t ~ T they are almost equal)
    measurable = (TIMESTEPS > 0) & (TIMESTEPS <= 250)

    vlb = vlb_terms(scheduler, exact, posterior_v, x0, x_t, TIMESTEPS, prediction_type)
    assert vlb.shape == (len(TIMESTEPS),) and torch.isfinite(vlb).all()
    assert vlb[t_pos].abs().max() < 1e-6

    wrong_mean = vlb_terms(scheduler, exact + 0.1, posterior_v, x0, x_t, TIMESTEPS, prediction_type)
    wrong_var = vlb_terms(scheduler, exact, torch.ones_like(x0), x0, x_t, TIMESTEPS, prediction_type)
    for other in (wrong_mean, wrong_var):
        assert (other[measurable] > 1e-6).all() and (other[t_pos] > -1e-6).all()
    # t = 0: the decoder NLL, lowest for the exact mean
    assert wrong_mean[0] > vlb[0] and torch.isfinite(wrong_var[0])


def test_vlb_trains_only_the_variance(batch, learned):
    x0, noise = batch
    x_t = learned.add_noise(x0, noise, TIMESTEPS)
    output = torch.randn(len(TIMESTEPS), 8, 4, 4, generator=torch.Generator().manual_seed(4)).requires_grad_()
    hybrid = diffusion_loss(learned, output, x0, noise, x_t, TIMESTEPS, "epsilon", learned_variance=True,
                            vlb_weight=1.0)
    grad = torch.autograd.grad(hybrid.loss, output)[0]
    plain = diffusion_loss(learned, output[:, :4], x0, noise, x_t, TIMESTEPS, "epsilon")
    grad_plain = torch.autograd.grad(plain.loss, output)[0]
    torch.testing.assert_close(grad[:, :4], grad_plain[:, :4], rtol=0, atol=0)  # stop-gradient on the mean
    assert grad[:, 4:].abs().amax(dim=(1, 2, 3)).gt(0).all()  # every sample's v gets a gradient (t = 0 too)
    assert hybrid.vlb is not None and hybrid.logs().keys() == {"mse", "vlb"}
    torch.testing.assert_close(hybrid.loss, plain.loss + hybrid.vlb)


def test_learned_variance_needs_twice_the_channels(batch, learned):
    x0, noise = batch
    with pytest.raises(ValueError, match="learned_sigma=True"):
        diffusion_loss(learned, torch.zeros_like(x0), x0, noise, x0, TIMESTEPS, "epsilon", learned_variance=True)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
def test_the_validation_loss_is_one_scale_for_every_weighting(prediction_type):
    """The same weights score the same whatever weighting the run trains with (min-SNR, logit-normal or mode
    levels, offset noise); different weights score differently."""
    import dataclasses

    from ldm.flow_matching import flow_scheduler
    from ldm.tiny import tiny_text_encoder, tiny_unet, tiny_vae
    from ldm.tokenizer import load_tokenizer
    from ldm.training_step import BatchEncoder, Objective
    from ldm.validation_loss import validation_loss

    tok = load_tokenizer()
    encoder = BatchEncoder(tiny_vae(), tiny_text_encoder(tok), tok, random_flip=False)
    batches = [{"pixel_values": torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                "captions": ["a red fox", "a cat", ""]} for i in range(2)]
    scheduler = flow_scheduler() if prediction_type == "flow" else training_scheduler()
    plain = Objective(scheduler, prediction_type=prediction_type)
    weighted = [dataclasses.replace(plain, weighting_scheme="logit_normal", noise_offset=0.1),
                dataclasses.replace(plain, weighting_scheme="mode", caption_dropout=0.5, input_perturbation=0.1)]
    if prediction_type == "epsilon":
        weighted.append(dataclasses.replace(plain, snr_gamma=5.0))
    denoiser = tiny_unet()
    want = validation_loss(denoiser, encoder, plain, batches, buckets=2)
    for objective in weighted:
        assert validation_loss(denoiser, encoder, objective, batches, buckets=2) == want
    assert validation_loss(tiny_unet(seed=1), encoder, plain, batches, buckets=2)["val_loss"] != want["val_loss"]


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_input_perturbation_moves_the_input_but_not_the_target(gamma):
    """x_t is built from eps + gamma xi and the loss is against eps; gamma = 0 makes no extra draw (the draws of a
    run without it are unchanged)."""
    from ldm.tiny import tiny_text_encoder, tiny_unet, tiny_vae
    from ldm.tokenizer import load_tokenizer
    from ldm.training_step import BatchEncoder, Objective, diffusion_step, draw_noise

    tok = load_tokenizer()
    encoder = BatchEncoder(tiny_vae(), tiny_text_encoder(tok), tok, random_flip=False)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "captions": ["a red fox", "a cat"]}
    objective = Objective(training_scheduler(), caption_dropout=0.0, input_perturbation=gamma)
    denoiser, seen = tiny_unet(), {}
    denoiser.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output.sample))
    with torch.no_grad():
        loss = diffusion_step(denoiser, encoder, objective, batch, torch.Generator().manual_seed(3)).loss
        generator = torch.Generator().manual_seed(3)  # the same draws, in the step's order
        x0, _, _ = encoder(batch, generator)
        noise = draw_noise(x0.shape, 0.0, generator)
        xi = torch.randn(x0.shape, generator=generator) if gamma else torch.zeros_like(x0)
        t = torch.randint(0, 1000, (2,), generator=generator)
    torch.testing.assert_close(seen["x"], objective.scheduler.add_noise(x0, noise + gamma * xi, t))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(seen["out"], noise))
    if gamma:
        assert not torch.allclose(loss, torch.nn.functional.mse_loss(seen["out"], noise + gamma * xi))
