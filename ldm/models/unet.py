"""Conditional U-Net denoiser for latent text-to-image diffusion.

Layout (per resolution level ``i`` with ``block_out_channels[i]`` channels)::

    conv_in -> [ResBlock -> (SpatialTransformer)] x layers_per_block -> Downsample   (down path, skips saved)
            -> ResBlock -> SpatialTransformer -> ResBlock                            (middle)
            -> [concat skip -> ResBlock -> (SpatialTransformer)] x (layers_per_block + 1) -> Upsample
            -> GroupNorm -> SiLU -> conv_out

* ResBlocks take the timestep embedding as a scale-shift (FiLM): ``GN(h) * (1 + scale) + shift``.
* SpatialTransformers (self-attention, text cross-attention with padding mask, GEGLU MLP) sit at the levels
  where ``attention_levels[i]`` is true and always in the middle.
* Attention is diffusers' ``Attention`` module: torch SDPA by default, xformers via
  ``enable_xformers_memory_efficient_attention()``, LoRA-able ``to_q/to_k/to_v/to_out.0`` projections.
* ``learned_sigma=True`` doubles the output channels: ``[prediction, variance interpolation v]`` for the
  learned-range variance of improved DDPM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import ConditionEmbedding, DenoiserMixin, resolve_out_channels


#: U-Net sizes like the DiT's registry: ``--denoiser_config unet-s`` (about 17M parameters at 256-wide text, the
#: emoji teacher), ``unet-b`` (52M, this class's defaults), ``unet-l``.
UNET_SIZES: dict[str, dict] = {
    "S": dict(block_out_channels=(64, 128, 192), attention_levels=(False, True, True), layers_per_block=2,
              attention_head_dim=32),
    "B": dict(block_out_channels=(128, 256, 384), attention_levels=(True, True, False), layers_per_block=2,
              attention_head_dim=64),
    "L": dict(block_out_channels=(192, 384, 576), attention_levels=(False, True, True), layers_per_block=2,
              attention_head_dim=64),
}


def unet_size_config(name: str) -> dict:
    """'unet-s' / 'UNet-B' / 'l' -> the registry's config entries."""
    key = name.strip().lower().removeprefix("unet-").upper()
    if key not in UNET_SIZES:
        sizes = ", ".join(f"unet-{k.lower()}" for k in UNET_SIZES)
        raise ValueError(f"Unknown U-Net size {name!r}; choose one of {sizes}.")
    return dict(UNET_SIZES[key])


class ResBlock(nn.Module):
    """(B, C_in, H, W), temb (B, T) -> (B, C_out, H, W); timestep enters as scale-shift after the 2nd norm."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # GN(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU MLP; (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None,
                attention_kwargs: dict) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), **attention_kwargs)
        x = x + self.attn2(self.norm2(x), encoder_hidden_states=context, attention_mask=context_bias,
                           **attention_kwargs)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): GroupNorm, project to tokens, ``depth`` TransformerBlocks, zero-init projection
    back."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, depth: int, groups: int, dropout: float):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"{channels} channels are not divisible by attention_head_dim={head_dim}")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, channels // head_dim, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None,
                attention_kwargs: dict) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.blocks:
            tokens = block(tokens, context, context_bias, attention_kwargs)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class UNetLayer(nn.Module):
    """One ResBlock, optionally followed by a SpatialTransformer: the unit the U-Net loops (and checkpoints) over."""

    def __init__(self, in_ch, out_ch, temb_ch, attention, head_dim, context_dim, depth, groups, dropout):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_ch, groups, dropout)
        self.attn = (
            SpatialTransformer(out_ch, head_dim, context_dim, depth, groups, dropout) if attention else None
        )

    def forward(self, x, temb, context, context_bias, attention_kwargs):
        x = self.res(x, temb)
        return self.attn(x, context, context_bias, attention_kwargs) if self.attn is not None else x


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2), strided 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, *_):
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W), nearest then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *_):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetModel(DenoiserMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""Text-conditioned U-Net denoiser.

    Args:
        sample_size: latent height/width used as the default image size (pixels = sample_size x VAE factor).
        in_channels: latent channels.
        out_channels: prediction channels; defaults to ``in_channels`` (``2 * in_channels`` with ``learned_sigma``).
        learned_sigma: also predict the learned-range variance interpolation (improved DDPM).
        block_out_channels: channels per resolution level; each level but the last halves the resolution.
        attention_levels: per level, whether its layers carry a SpatialTransformer.
        layers_per_block: ResBlocks per level on the way down (one more on the way up).
        attention_head_dim: channels per attention head (heads = channels / head_dim).
        transformer_layers_per_block: TransformerBlocks inside each SpatialTransformer.
        cross_attention_dim: width of the text-encoder tokens (must equal the text encoder's hidden size).
        norm_num_groups: GroupNorm groups.
        dropout: dropout in ResBlocks and attention.
        guidance_embedding: embed a guidance weight next to the timestep (guidance-distilled students).
    """

    _no_split_modules = ["UNetLayer"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32, in_channels: int = 4, out_channels: int | None = None,  # latents in, prediction out
        learned_sigma: bool = False, block_out_channels: tuple[int, ...] = (128, 256, 384),
        attention_levels: tuple[bool, ...] = (True, True, False),
        layers_per_block: int = 2,
        attention_head_dim: int = 64,
        transformer_layers_per_block: int = 1,
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        guidance_embedding: bool = False,
    ):
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but block_out_channels has "
                f"{len(block_out_channels)}; give one flag per resolution level."
            )
        out_channels = resolve_out_channels(in_channels, out_channels, learned_sigma)
        self.gradient_checkpointing = False
        ch0 = block_out_channels[0]
        temb_ch = 4 * ch0
        self.time_embed = ConditionEmbedding(ch0, temb_ch, guidance_embedding)

        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        ch = self._build_levels(temb_ch)  # self.down, self.mid, self.up
        self.norm_out = nn.GroupNorm(norm_num_groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _build_levels(self, temb_ch: int) -> int:
        """The down path, the middle and the up path (``self.down``, ``self.mid``, ``self.up``); returns the
        channels of the last up layer."""
        c = self.config

        def layer(cin, cout, attention):
            return UNetLayer(cin, cout, temb_ch, attention, c.attention_head_dim, c.cross_attention_dim,
                             c.transformer_layers_per_block, c.norm_num_groups, c.dropout)

        self.down = nn.ModuleList()
        ch = c.block_out_channels[0]
        skip_channels = [ch]
        for level, (cout, attention) in enumerate(zip(c.block_out_channels, c.attention_levels)):
            for _ in range(c.layers_per_block):
                self.down.append(layer(ch, cout, attention))
                ch = cout
                skip_channels.append(ch)
            if level < len(c.block_out_channels) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([layer(ch, ch, True), layer(ch, ch, False)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(c.block_out_channels))):
            cout, attention = c.block_out_channels[level], c.attention_levels[level]
            for _ in range(c.layers_per_block + 1):
                self.up.append(layer(ch + skip_channels.pop(), cout, attention))
                ch = cout
            if level > 0:
                self.up.append(Upsample(ch))
        return ch

    @property
    def sample_divisor(self) -> int:
        """Latent height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def divisor_reason(self) -> str:
        return f"the U-Net halves the resolution {len(self.config.block_out_channels) - 1} times"

    def denoise(self, sample, temb, context, bias, attention_kwargs: dict) -> torch.Tensor:
        """sample (B, C, H, W), temb (B, T), text tokens (B, L, D_txt), bias (B, 1, L) -> (B, C_out, H, W)."""
        x = self.conv_in(sample)
        skips = [x]
        for module in self.down:
            x = self._run(module, x, temb, context, bias, attention_kwargs)
            skips.append(x)
        for module in self.mid:
            x = self._run(module, x, temb, context, bias, attention_kwargs)
        for module in self.up:
            if isinstance(module, UNetLayer):
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(module, x, temb, context, bias, attention_kwargs)
        return self.conv_out(F.silu(self.norm_out(x)))
