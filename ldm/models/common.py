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
import torch.nn.functional as F
from diffusers.models.activations import GEGLU, GELU
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


def drop_padding(
    context: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the trailing text tokens every sample masks out: context (B, L, D), mask (B, L) -> (B, L', D), (B, L').

    Exact: a masked token gets a -10000 bias, whose softmax weight is 0 in every float dtype, so dropping it changes
    nothing but the work (CLIP prompts are padded to 77 tokens; a guided batch of short prompts uses 10-30). Left
    alone: no mask, a 3-dim bias, a sample that masks every token (it attends uniformly to all L), and
    tracing/compiling (the length is data-dependent). Costs one host sync per forward on accelerators.
    """
    if mask is None or mask.ndim != 2:
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


class DenoiserAttnProcessor:
    """Default attention processor of the ldm denoisers: torch SDPA, a (B, 1, L) additive bias broadcast over heads.

    Same math as diffusers' ``AttnProcessor2_0`` for the plain ``Attention`` layers the denoisers build (no norms,
    no residual, output scale 1), without its per-head copy of the mask and its division by ``rescale_output_factor``.
    ``enable_xformers_memory_efficient_attention()``/``set_attn_processor()`` replace it as usual; LoRA on
    ``to_q/to_k/to_v/to_out.0`` works unchanged.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, N, D), encoder_hidden_states (B, L, D_ctx) or None, attention_mask (B, 1|N, L) bias."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (z.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, N|L, d)
        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1).to(q.dtype)  # (B, 1, 1|N, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads, N, d)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)`` for a diffusers ``FeedForward`` with a GELU or GEGLU activation: (B, N, D) -> (B, N, D).

    Same modules (LoRA on ``net.0.proj``/``net.2`` applies) and the same numbers; but when autograd does not need the
    activations (inference, frozen weights), the GELU and the gating run in place on the (B, N, inner) projection
    instead of allocating one or two more buffers that size (on CPU those are page-faulted in on every call).
    """
    act, *rest = ff.net
    if not isinstance(act, (GELU, GEGLU)) or x.device.type not in ("cpu", "cuda"):
        return ff(x)
    h = act.proj(x)  # (B, N, inner), GEGLU: (B, N, 2 * inner)
    in_place = not h.requires_grad
    if isinstance(act, GEGLU):
        h, gate = h.chunk(2, dim=-1)
        h = h.mul_(torch.ops.aten.gelu_(gate)) if in_place else h * F.gelu(gate)
    elif in_place:
        h = torch.ops.aten.gelu_(h, approximate=act.approximate)
    else:
        h = F.gelu(h, approximate=act.approximate)
    for module in rest:  # dropout, Linear(inner, D)
        h = module(h)
    return h


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
