"""Diffusion Transformer (DiT) denoiser with text cross-attention.

Peebles & Xie (2023) "Scalable Diffusion Models with Transformers", with PixArt-alpha's text conditioning:

    latents (B, C, H, W) --patchify (p x p conv)--> tokens (B, N, D), N = (H/p)(W/p), + fixed 2D sin-cos positions
    for each block:  x += gate1 * SelfAttn(modulate(LN(x)))            adaLN from the timestep (and guidance) embedding
                     x += CrossAttn(LN(x), caption tokens, padding mask)
                     x += gate2 * MLP(modulate(LN(x)))
    final: modulate(LN(x)) -> zero-initialised Linear(D, p*p*C_out) --unpatchify--> (B, C_out, H, W)

``adaln="zero"`` is DiT's adaLN-Zero (a zero-initialised ``Linear(D, 6D)`` per block); ``adaln="single"`` is PixArt's
adaLN-single (one shared ``Linear(D, 6D)`` plus a learned per-block table), which saves ~25% of the parameters.
Sizes follow DiT: ``DiTModel.from_size("DiT-S/2", cross_attention_dim=...)``.
"""

from __future__ import annotations

import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import ConditionEmbedding, DenoiserMixin, resolve_out_channels

#: DiT model sizes (depth, hidden size, heads), from Peebles & Xie, Table 1. Patch sizes 2, 4, 8.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_attention_heads=6),
    "B": dict(depth=12, hidden_size=768, num_attention_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_attention_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_attention_heads=16),
}
DIT_PATCH_SIZES = (2, 4, 8)


def dit_size_config(name: str) -> dict[str, int]:
    """'DiT-S/2' / 'dit-xl/8' / 'S/4' -> dict(depth, hidden_size, num_attention_heads, patch_size)."""
    m = re.fullmatch(r"(?:dit-)?(s|b|l|xl)/(\d+)", name.strip().lower())
    if m is None or int(m.group(2)) not in DIT_PATCH_SIZES:
        names = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCH_SIZES)
        raise ValueError(f"Unknown DiT size {name!r}; choose one of {names}.")
    return dict(DIT_SIZES[m.group(1).upper()], patch_size=int(m.group(2)))


#: State-dict keys of DiT checkpoints saved by ldm <= 0.1 (own patch conv and caption MLP) -> today's modules.
LEGACY_KEYS = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias",
               "caption_projection.0.weight": "caption_projection.linear_1.weight",
               "caption_projection.0.bias": "caption_projection.linear_1.bias",
               "caption_projection.2.weight": "caption_projection.linear_2.weight",
               "caption_projection.2.bias": "caption_projection.linear_2.bias"}


def convert_legacy_state_dict(state_dict: dict, prefix: str = "") -> dict:
    """Rename (in place) the keys of an older DiT checkpoint to the current module names; returns it."""
    for old, new in LEGACY_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    return state_dict


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), shift/scale (B, 1, D) -> x * (1 + scale) + shift, in one pass over x."""
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(nn.Module):
    """(B, N, D) tokens, modulation (B, 6, D), caption (B, L, D), bias (B, 1, L) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, adaln: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads, bias=True, )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim // heads, bias=True, )
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        if adaln == "single":  # PixArt: shared projection + per-block learned offsets
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        else:  # DiT adaLN-Zero: per-block projection of the conditioning vector
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, context, context_bias, attention_kwargs):
        if hasattr(self, "scale_shift_table"):
            mod = self.scale_shift_table[None] + cond  # cond: (B, 6, D) from the shared projection
        else:
            mod = self.adaLN_modulation(cond).unflatten(1, (6, -1))  # cond: (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(2).unbind(1)  # each (B, 1, D)
        x = torch.addcmul(x, gate1, self.attn1(modulate(self.norm1(x), shift1, scale1), **attention_kwargs))
        x = x + self.attn2(self.norm2(x), encoder_hidden_states=context, attention_mask=context_bias,
                           **attention_kwargs)
        return torch.addcmul(x, gate2, self.ff(modulate(self.norm3(x), shift2, scale2)))


class DiTModel(DenoiserMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""Text-conditioned DiT denoiser.

    Args:
        sample_size: latent height/width used as the default image size and for the cached position table.
        in_channels: latent channels.
        out_channels: prediction channels; defaults to ``in_channels`` (``2 * in_channels`` with ``learned_sigma``).
        learned_sigma: also predict the learned-range variance interpolation (improved DDPM).
        patch_size: p; latents are cut into p x p patches (latent height/width must be multiples of p).
        hidden_size, depth, num_attention_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        cross_attention_dim: width of the text-encoder tokens (must equal the text encoder's hidden size).
        adaln: ``"zero"`` (DiT adaLN-Zero) or ``"single"`` (PixArt adaLN-single).
        guidance_embedding: embed a guidance weight next to the timestep (guidance-distilled students).
    """

    _no_split_modules = ["DiTBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32, in_channels: int = 4, out_channels: int | None = None,  # latents in, prediction out
        learned_sigma: bool = False, patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        cross_attention_dim: int = 768,
        adaln: str = "single",
        guidance_embedding: bool = False,
    ):
        super().__init__()
        if adaln not in ("zero", "single"):
            raise ValueError(f"adaln must be 'zero' or 'single', got {adaln!r}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} (latent side) is not a multiple of patch_size={patch_size}; "
                             f"use a larger resolution or a smaller patch.")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        if (sample_size // patch_size) ** 2 * hidden_size > 2**30:
            raise ValueError(f"sample_size={sample_size} with patch_size={patch_size} gives a position table of "
                             f"{(sample_size // patch_size) ** 2} tokens x {hidden_size} (over 4 GiB); sample_size "
                             "is the latent side (image side / the VAE factor), e.g. 32 for 256 px.")
        out_channels = resolve_out_channels(in_channels, out_channels, learned_sigma)
        self.gradient_checkpointing = False
        self.out_channels = out_channels
        d = hidden_size

        # diffusers' patchify (p x p conv + flatten) and PixArt's caption MLP; positions are ours (below)
        self.patch_embed = PatchEmbed(sample_size, sample_size, patch_size, in_channels, d, pos_embed_type=None)
        self.register_buffer("pos_embed", self._sincos(sample_size // patch_size, sample_size // patch_size),
                             persistent=False)
        self.caption_projection = PixArtAlphaTextProjection(cross_attention_dim, d, act_fn="gelu_tanh")
        self.time_embed = ConditionEmbedding(256, d, guidance_embedding)
        if adaln == "single":
            self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.final_scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        else:
            self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.blocks = nn.ModuleList(DiTBlock(d, num_attention_heads, mlp_ratio, adaln) for _ in range(depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(d, patch_size * patch_size * out_channels)
        self.initialize_weights()
        # nn.Module.load_state_dict of an older checkpoint (from_pretrained uses _fix_state_dict_keys_on_load)
        self._register_load_state_dict_pre_hook(lambda sd, prefix, *_: convert_legacy_state_dict(sd, prefix))

    def _sincos(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Fixed (1, grid_h * grid_w, D) 2D sin-cos position table (rows first, row-major tokens).

        Token (i, j) sits at (i s, j s) in units of a trained patch, s = min(1, base / max(grid_h, grid_w)) with
        base the trained grid side: integer coordinates up to the trained size; a larger grid is spread over the
        trained range instead of reaching positions never seen. One scale for both axes keeps patches square on
        non-square grids. At the trained size this is DiT's table exactly.
        """
        base = self.config.sample_size // self.config.patch_size
        scale = min(1.0, base / max(grid_h, grid_w))
        rows = torch.arange(grid_h, dtype=torch.float32) * scale
        cols = torch.arange(grid_w, dtype=torch.float32) * scale
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"))  # (2, H, W): column then row, as diffusers
        return get_2d_sincos_pos_embed_from_grid(self.config.hidden_size, grid.reshape(2, 1, -1)).float()[None]

    def positions(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """The position table of a grid, cached per (grid, device): the trained grid's is a buffer."""
        if grid_h == grid_w == self.config.sample_size // self.config.patch_size:
            return self.pos_embed
        key = (grid_h, grid_w, str(device))
        cache = self.__dict__.setdefault("_position_cache", {})
        if key not in cache:
            cache[key] = self._sincos(grid_h, grid_w).to(device)
        return cache[key]

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zero biases, N(0, 0.02) embeddings, zero adaLN projections and output layer."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for emb in (self.time_embed.time_embedding, self.time_embed.guidance_embedding):
            if emb is not None:
                nn.init.normal_(emb.linear_1.weight, std=0.02)
                nn.init.normal_(emb.linear_2.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_2.weight, std=0.02)
        zero = [self.proj_out]
        if self.config.adaln == "single":
            nn.init.normal_(self.adaln_single[1].weight, std=0.02)
        else:
            zero += [blk.adaLN_modulation[1] for blk in self.blocks] + [self.final_adaLN_modulation[1]]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        """``from_pretrained`` hook: checkpoints saved before the switch to diffusers' modules still load."""
        super()._fix_state_dict_keys_on_load(state_dict)
        convert_legacy_state_dict(state_dict)

    @property
    def sample_divisor(self) -> int:
        """Latent height and width must be multiples of the patch size."""
        return self.config.patch_size

    divisor_reason = "the patch size"

    def denoise(self, sample, temb, context, bias, attention_kwargs: dict) -> torch.Tensor:
        """sample (B, C, H, W), temb (B, D), text tokens (B, L, D_txt), bias (B, 1, L) -> (B, C_out, H, W)."""
        b, _, h, w = sample.shape
        p = self.config.patch_size
        gh, gw = h // p, w // p
        pos = self.positions(gh, gw, sample.device)  # (1, N, D)
        # (B, N, D), made contiguous once: a transposed residual stream would make every LayerNorm copy it
        x = self.patch_embed(sample).contiguous() + pos.to(sample.dtype)
        context = self.caption_projection(context)  # (B, L, D)
        if self.config.adaln == "single":
            cond = self.adaln_single(temb).unflatten(1, (6, -1))  # (B, 6, D)
            shift, scale = (self.final_scale_shift_table[None] + temb[:, None]).unsqueeze(2).unbind(1)
        else:
            cond = temb
            shift, scale = self.final_adaLN_modulation(temb).unflatten(1, (2, -1)).unsqueeze(2).unbind(1)
        for block in self.blocks:
            x = self._run(block, x, cond, context, bias, attention_kwargs)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, N, p*p*C_out)
        x = x.reshape(b, gh, gw, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.out_channels, h, w)

    @classmethod
    def from_size(cls, name: str, **kwargs) -> "DiTModel":
        """Build a randomly initialised DiT of a registry size, e.g.
        ``DiTModel.from_size("DiT-B/2", cross_attention_dim=768)``."""
        return cls(**{**dit_size_config(name), **kwargs})
