"""peft LoRA on both denoisers: add_adapter changes the output, save_lora_adapter / load_lora_adapter reproduce it."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from ldm.tiny import TEXT_WIDTH, tiny_dit, tiny_unet

from conftest import assert_different

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDERS = {"unet": tiny_unet, "dit": tiny_dit}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config() -> LoraConfig:
    # init_lora_weights=False: random A and B, so the adapter changes the output straight away
    return LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 7, TEXT_WIDTH, generator=g))


@pytest.mark.parametrize("kind", ["unet", "dit"])
@torch.no_grad()
def test_lora_round_trip(kind, inputs, tmp_path):
    x, t, context = inputs
    model = BUILDERS[kind]()
    base = model(x, t, context).sample

    torch.manual_seed(1)
    model.add_adapter(lora_config())
    adapted = model(x, t, context).sample
    assert_different(adapted, base)
    n_attention = sum(1 for name, _ in model.named_modules() if name.endswith(("attn1", "attn2")))
    n_lora_layers = sum(1 for name, _ in model.named_modules() if name.endswith(tuple(TARGETS)) and
                        hasattr(model.get_submodule(name), "lora_A"))
    assert n_lora_layers == 4 * n_attention > 0

    model.save_lora_adapter(tmp_path)
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * n_lora_layers and all(".lora_A." in k or ".lora_B." in k for k in keys)

    fresh = BUILDERS[kind]()
    torch.testing.assert_close(fresh(x, t, context).sample, base)  # same seeded base weights
    # diffusers 0.42's load_lora_adapter only looks for safetensors when asked (else it wants a pickle .bin)
    fresh.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    torch.testing.assert_close(fresh(x, t, context).sample, adapted, rtol=0, atol=1e-6)

    # the adapter is switchable: disabled, the base output comes back
    fresh.disable_adapters()
    torch.testing.assert_close(fresh(x, t, context).sample, base, rtol=0, atol=1e-6)
