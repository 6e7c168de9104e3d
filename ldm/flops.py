"""Counting FLOPs of a model call with torch's ``FlopCounterMode`` (the benches' GFLOP/s, the recipes' training
FLOPs).

``FlopCounterMode`` has no formula for the CPU flash-attention kernels that ``F.scaled_dot_product_attention`` uses on
CPU (forward and backward); without these, attention would count as 0 FLOPs. The backward is 2.5x the forward
(torch's formula for the CUDA kernels: dV, dP, dQ, dK, plus the recomputed scores).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

FLOP_MAP = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda go, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(go, q, k, v),
}


def count_flops(fn, no_grad: bool = True, by_op: bool = False):
    """FLOPs of one ``fn()`` call (under ``torch.no_grad()`` unless ``no_grad=False``, e.g. for a training step).

    With ``by_op``, returns (total, {op name: FLOPs}).
    """
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_MAP)
    with torch.set_grad_enabled(not no_grad), counter:
        fn()
    total = int(counter.get_total_flops())
    if not by_op:
        return total
    return total, {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}


def denoiser_training_flops(denoiser: torch.nn.Module, text_length: int = 77) -> int:
    """FLOPs of one training image through ``denoiser``: forward and backward of a batch of one at its
    ``sample_size`` latents, with ``text_length`` caption tokens (the tokenizer's padded length)."""
    config = denoiser.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, requires_grad=False)
    text = torch.randn(1, text_length, config.cross_attention_dim)
    t = torch.tensor([500])

    def fwd_bwd():
        out = denoiser(latents, t, encoder_hidden_states=text).sample
        out.float().pow(2).mean().backward()

    flops = count_flops(fwd_bwd, no_grad=False)
    denoiser.zero_grad(set_to_none=True)
    return flops
