"""Tiny, seeded, offline components: for tests, benchmarks and the on-the-fly demo pipeline.

Everything is randomly initialised from a config with a fixed seed, so two calls give identical weights; nothing is
downloaded. ``tiny_pipeline()`` assembles a ``LatentPipeline`` of ~1M parameters that samples 64 px in a second.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from .models import DiTModel, UNetModel
from .tokenizer import MAX_LENGTH, load_tokenizer

TEXT_WIDTH = 32


def _wake_zero_init(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised weight matrices (output layers, adaLN-Zero) small random values.

    A freshly initialised denoiser predicts exactly zero, which would make every tiny pipeline produce the same
    image whatever its weights; tests need outputs that depend on the weights and the prompt.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)
    return model


def tiny_text_encoder(tokenizer, hidden_size: int = TEXT_WIDTH, seed: int = 0, num_layers: int = 2,
                      num_heads: int = 2, token_embedding_std: float | None = None) -> CLIPTextModel:
    """Small seeded ``CLIPTextModel`` sized from ``len(tokenizer)`` (which can exceed vocab.json).

    ``token_embedding_std`` redraws the token embeddings with that std (CLIP's init uses 0.02). A frozen random
    encoder with 0.02 lets its random layers swamp each word's identity: in "a white circle ...", changing the
    colour word moves the "circle" state more than changing "circle" to "square" does, so a denoiser trained on
    it learns whole caption combinations instead of attributes. At 1.0 each word keeps its identity.
    """
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden_size, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config).eval()
    if token_embedding_std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=token_embedding_std)
    return model


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """``AutoencoderKL`` with 4 latent channels and a x8 downsampling factor (4 levels of 8-16 channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def tiny_unet(cross_attention_dim: int = TEXT_WIDTH, seed: int = 0, **overrides) -> UNetModel:
    """Two-level U-Net (32/64 channels, attention at the lower resolution), 8x8 latents."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, block_out_channels=(32, 64), attention_levels=(False, True), layers_per_block=1,
        attention_head_dim=16, cross_attention_dim=cross_attention_dim, norm_num_groups=8,
    )
    return _wake_zero_init(UNetModel(**{**config, **overrides})).eval()


def tiny_dit(cross_attention_dim: int = TEXT_WIDTH, seed: int = 0, **overrides) -> DiTModel:
    """2-block DiT of width 64, patch 2, 8x8 latents."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, patch_size=2, hidden_size=64, depth=2, num_attention_heads=4,
        cross_attention_dim=cross_attention_dim,
    )
    return _wake_zero_init(DiTModel(**{**config, **overrides})).eval()


def tiny_scheduler(kind: str = "ddim", **overrides):
    """DDIM (default) or DDPM scheduler with the linear 1e-4..0.02 schedule over 1000 steps."""
    config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**{**config, "set_alpha_to_one": False, **overrides})
    if kind == "ddpm":
        return DDPMScheduler(**{**config, **overrides})
    raise ValueError(f"kind must be 'ddim' or 'ddpm', got {kind!r}")


def tiny_components(denoiser: str = "unet", seed: int = 0, scheduler: str = "ddim", **denoiser_overrides) -> dict:
    """Keyword arguments for ``LatentPipeline(**components)``: vae, text_encoder, tokenizer, denoiser, scheduler."""
    if denoiser not in ("unet", "dit"):
        raise ValueError(f"denoiser must be 'unet' or 'dit', got {denoiser!r}")
    tokenizer = load_tokenizer()
    build = tiny_unet if denoiser == "unet" else tiny_dit
    return dict(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        denoiser=build(seed=seed, **denoiser_overrides),
        scheduler=tiny_scheduler(scheduler),
    )


def tiny_pipeline(denoiser: str = "unet", seed: int = 0, scheduler: str = "ddim", **denoiser_overrides):
    """A seeded, randomly initialised ``LatentPipeline`` (64 px images of noise-like patterns)."""
    from pipelines import LatentPipeline

    pipe = LatentPipeline(**tiny_components(denoiser, seed, scheduler, **denoiser_overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe
