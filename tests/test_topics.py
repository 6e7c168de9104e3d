"""The topic modules' own behaviour: latent space (``ldm.latents``) and classifier-free guidance (``ldm.guidance``)."""

from __future__ import annotations

import pytest
import torch

from ldm.guidance import combine, drop_captions, embedding_input, sample_scales
from ldm.latents import from_denoiser_space, sample_posterior, to_denoiser_space, vae_scale_factor
from ldm.tiny import tiny_vae


@pytest.mark.parametrize("shift", [None, 0.0609])
def test_denoiser_space_is_the_exact_inverse(shift):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=shift)
    z = torch.randn(2, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    latents = to_denoiser_space(z, vae)
    torch.testing.assert_close(latents, (z - (shift or 0.0)) * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(from_denoiser_space(latents, vae), z, rtol=0, atol=1e-7)


def test_vae_factor_from_a_vae_its_config_or_its_channels():
    vae = tiny_vae()  # 4 levels: 3 halvings
    assert vae_scale_factor(vae) == vae_scale_factor(vae.config) == vae_scale_factor((8, 16, 16, 16)) == 8
    assert vae_scale_factor([32, 64]) == 2


def test_posterior_draw_is_seeded_and_the_mean_mode_has_no_noise():
    params = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    a = sample_posterior(params, "posterior", torch.Generator().manual_seed(7))
    b = sample_posterior(params, "posterior", torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    mean, logvar = params.chunk(2, dim=1)
    assert (a - mean).abs().max() > 1e-3
    torch.testing.assert_close(sample_posterior(params, "mean", None), mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="posterior' or 'mean"):
        sample_posterior(params, "mode", None)


def test_caption_dropout_replaces_whole_captions_with_the_empty_one():
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(64, 5, 3, generator=g), torch.ones(64, 5, dtype=torch.long)
    empty, empty_mask = torch.zeros(1, 5, 3), torch.tensor([[1, 1, 0, 0, 0]])
    kept, kept_mask = drop_captions(embeds, mask, empty, empty_mask, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(kept, embeds) and torch.equal(kept_mask, mask)
    out, out_mask = drop_captions(embeds, mask, empty, empty_mask, 0.5, torch.Generator().manual_seed(3))
    dropped = (out == 0).flatten(1).all(1)
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(out[~dropped], embeds[~dropped]) and (out_mask[dropped] == empty_mask).all()
    again, _ = drop_captions(embeds, mask, empty, empty_mask, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again, out)


def test_guidance_combination_and_scale_inputs():
    u, c = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(combine(u, c, 1.0), c)  # s = 1: the conditional model
    torch.testing.assert_close(combine(u, c, 3.0), 3 * c)
    per_sample = combine(u, c, torch.tensor([1.0, 5.0]))
    assert per_sample[0].eq(1).all() and per_sample[1].eq(5).all()
    scales = sample_scales(2.0, 4.0, 1000, torch.Generator().manual_seed(0))
    assert 2.0 <= float(scales.min()) and float(scales.max()) < 4.0
    torch.testing.assert_close(embedding_input(torch.tensor([1.5])), torch.tensor([1500.0]))
