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
from diffusers.utils.peft_utils import apply_lora_scale
from torch import nn

from ..guidance import embedding_input


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of a denoiser: ``sample`` (B, C_out, H, W), the model prediction
    (epsilon, x0 or v; with learned sigma the second half of the channels is the variance interpolation)."""

    sample: torch.Tensor


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) keep-mask of 1/0 (or bool) -> (B, 1, L) additive attention bias (0 keep, -10000 drop)."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(f"encoder_attention_mask must have shape (batch, tokens), got {tuple(mask.shape)}")
    return ((1.0 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def drop_padding(
    context: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the trailing text tokens every sample masks out: context (B, L, D), mask (B, L) -> (B, L', D), (B, L').

    Exact: a masked token gets a -10000 bias, whose softmax weight is 0 in every float dtype, so dropping it changes
    nothing but the work (CLIP prompts are padded to 77 tokens; a guided batch of short prompts uses 10-30). Left
    alone: no mask, a sample that masks every token (it attends uniformly to all L), and
    tracing/compiling (the length is data-dependent). Costs one host sync per forward on accelerators.
    """
    if mask is None:
        return context, mask
    if mask.shape != context.shape[:2]:
        raise ValueError(
            f"encoder_attention_mask has shape {tuple(mask.shape)} but encoder_hidden_states has (batch, tokens) = "
            f"{tuple(context.shape[:2])}; pass one 1/0 entry per text token."
        )
    if _is_compiling() or torch.jit.is_tracing():
        return context, mask
    keep = mask != 0
    # one host sync: [every sample keeps a token, index of the last token any sample keeps]
    every_row, last = torch.stack([keep.any(1).all().long(), keep.any(0).long().cumsum(0).argmax()]).tolist()
    if not every_row or last + 1 == mask.shape[1]:
        return context, mask
    return context[:, : last + 1], mask[:, : last + 1]


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def resolve_out_channels(in_channels: int, out_channels: int | None, learned_sigma: bool) -> int:
    """Prediction channels: ``in_channels``, doubled with a learned sigma (``[prediction, variance]``)."""
    out_channels = out_channels or (2 * in_channels if learned_sigma else in_channels)
    if learned_sigma and out_channels != 2 * in_channels:
        raise ValueError(f"learned_sigma needs out_channels = 2 x in_channels = {2 * in_channels}")
    return out_channels


def check_denoiser_inputs(sample: torch.Tensor, encoder_hidden_states: torch.Tensor, divisor: int, why: str) -> None:
    """sample (B, C, H, W) with H, W multiples of ``divisor`` (``why`` says which part needs it); text batch B."""
    b, _, h, w = sample.shape
    if h % divisor or w % divisor:
        raise ValueError(f"Latent size {h}x{w} is not divisible by {divisor} ({why}); pick a height/width that is.")
    if encoder_hidden_states.shape[0] != b:
        raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]} but sample has batch {b}")


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


class DenoiserMixin:
    """The call both denoisers share: input checks, the timestep (+ guidance) embedding, the padding cut and the
    attention bias, then the architecture's own ``denoise(sample, temb, context, bias)`` -> (B, C_out, H, W).

    Subclasses define ``time_embed`` (a :class:`ConditionEmbedding`), ``sample_divisor`` and ``divisor_reason``.
    Listed first among the bases, so this ``forward`` is the model's.
    """

    _supports_gradient_checkpointing = True

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, L, D_txt), mask (B, L) -> (B, C_out, H, W).

        ``cross_attention_kwargs``: ``{"scale": s}`` scales the LoRA adapters for this call (peft); the other entries
        go to every attention processor, as in diffusers' U-Net.
        """
        check_denoiser_inputs(sample, encoder_hidden_states, self.sample_divisor, self.divisor_reason)
        timestep = broadcast_timestep(timestep, sample.shape[0], sample.device)
        temb = self.time_embed(timestep, guidance, sample.dtype)  # (B, T)
        context, mask = drop_padding(encoder_hidden_states, encoder_attention_mask)  # (B, L', D_txt), L' <= L
        bias = mask_to_bias(mask, sample.dtype)  # (B, 1, L')
        out = self.denoise(sample, temb, context, bias, cross_attention_kwargs or {})
        return DenoiserOutput(sample=out) if return_dict else (out,)

    def set_attention_slice(self, slice_size: str | int | None = "auto") -> None:
        """Sliced attention in every attention layer (diffusers' ``SlicedAttnProcessor``): ``"auto"`` halves the
        heads per slice, ``"max"`` runs one head at a time, an int that many heads, ``None`` goes back to SDPA.
        ``pipe.enable_attention_slicing()`` calls this."""
        from diffusers.models.attention_processor import Attention

        for module in self.modules():
            if isinstance(module, Attention):
                size = {"auto": max(1, module.sliceable_head_dim // 2), "max": 1}.get(slice_size, slice_size)
                module.set_attention_slice(size)

    def _run(self, module: nn.Module, *args) -> torch.Tensor:
        """``module(*args)``, through gradient checkpointing when it is on and autograd records."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class ConditionEmbedding(nn.Module):
    """Sinusoidal timestep (and optional guidance-weight) embedding -> (B, dim).

    The guidance branch embeds w like a timestep (``ldm.guidance.embedding_input``); it is used by
    guidance-distilled students (Meng et al. 2023).
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
            guidance = broadcast_timestep(guidance, timestep.shape[0], timestep.device)
            emb = emb + self.guidance_embedding(self.guidance_proj(embedding_input(guidance)).to(dtype))
        return emb
