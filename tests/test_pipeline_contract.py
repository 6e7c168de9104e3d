"""What diffusers' PipelineTesterMixin asks of a pipeline, tested here on LatentPipeline (both denoisers) without
fetching diffusers' tests: ``cross_attention_kwargs`` (per-call LoRA scale), the LoRA API, ``None`` components and
``encode_prompt`` in isolation, real attention slicing, ``dtype=`` / variants on ``from_pretrained``."""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest
import torch
from peft import LoraConfig

from ldm.tiny import tiny_components
from pipelines import LatentPipeline

from conftest import assert_different, sample

pytestmark = pytest.mark.usefixtures("single_thread")
KINDS = ["unet", "dit"]


def lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def build(kind: str, **replace) -> LatentPipeline:
    pipe = LatentPipeline(**{**tiny_components(kind), **replace})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_call_signature_has_diffusers_text_to_image_params():
    params = inspect.signature(LatentPipeline.__call__).parameters
    wanted = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
              "negative_prompt_embeds", "cross_attention_kwargs", "num_inference_steps", "num_images_per_prompt",
              "generator", "latents", "output_type", "return_dict", "callback_on_step_end",
              "callback_on_step_end_tensor_inputs"}
    assert wanted <= set(params)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_scale_per_call_and_the_lora_api(kind):
    pipe = build(kind)
    base = sample(pipe)
    torch.manual_seed(0)
    pipe.denoiser.add_adapter(lora(1), adapter_name="one")
    full = sample(pipe)
    assert_different(full, base)
    np.testing.assert_allclose(sample(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-5)
    half = sample(pipe, cross_attention_kwargs={"scale": 0.5})
    assert 0 < np.abs(half - base).max() < np.abs(full - base).max()
    np.testing.assert_allclose(sample(pipe), full, atol=1e-6)  # the scale held for that call only

    pipe.denoiser.add_adapter(lora(2), adapter_name="two")
    pipe.set_adapters(["one", "two"], [1.0, 0.0])  # several adapters, weighted
    assert sorted(pipe.get_active_adapters()) == ["one", "two"]
    np.testing.assert_allclose(sample(pipe), full, atol=1e-5)
    pipe.set_adapters(["one", "two"], [1.0, 1.0])
    both = sample(pipe)
    assert_different(both, full)

    pipe.fuse_lora()  # merged into the weights: same images
    np.testing.assert_allclose(sample(pipe), both, atol=1e-4)
    pipe.unfuse_lora()
    np.testing.assert_allclose(sample(pipe), both, atol=1e-4)
    pipe.disable_lora()
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)
    pipe.enable_lora()
    pipe.unload_lora_weights()
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)
    assert not any("lora" in name for name, _ in pipe.denoiser.named_parameters())


def _return_names(function) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    return [elt.id for elt in returns[-1].value.elts]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompt_works_in_isolation(kind):
    """As diffusers' test does: a pipeline of only the text encoder + tokenizer encodes, a pipeline of the other
    components samples from its outputs (passed by the names encode_prompt returns), equal to the full pipeline."""
    components = tiny_components(kind)
    text_only = LatentPipeline(**{k: (v if k in ("text_encoder", "tokenizer") else None)
                                  for k, v in components.items()})
    names = _return_names(LatentPipeline.encode_prompt)
    assert set(names) <= set(inspect.signature(LatentPipeline.__call__).parameters)
    with torch.no_grad():
        embeds = dict(zip(names, text_only.encode_prompt("a red fox")))
    no_text = build(kind, text_encoder=None, tokenizer=None)
    full = build(kind)
    np.testing.assert_allclose(sample(no_text, prompt=None, **embeds), sample(full, prompt="a red fox"), atol=1e-5)
    with pytest.raises(ValueError, match="no text encoder"):
        sample(no_text, prompt="a red fox")


@pytest.mark.parametrize("kind", KINDS)
def test_attention_slicing_is_real(kind):
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    pipe = build(kind)
    reference = sample(pipe)
    pipe.enable_attention_slicing()
    kinds = {type(p) for p in pipe.denoiser.attn_processors.values()}
    assert kinds == {SlicedAttnProcessor}
    np.testing.assert_allclose(sample(pipe), reference, atol=1e-4)
    pipe.enable_attention_slicing("max")
    np.testing.assert_allclose(sample(pipe), reference, atol=1e-4)
    pipe.disable_attention_slicing()
    assert {type(p) for p in pipe.denoiser.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_dict_and_variants_on_from_pretrained(kind, tmp_path):
    pipe = build(kind)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    loaded = LatentPipeline.from_pretrained(tmp_path / "fp16", variant="fp16",
                                            dtype={"denoiser": torch.bfloat16, "default": torch.float16})
    assert loaded.denoiser.dtype == torch.bfloat16
    assert loaded.vae.dtype == loaded.text_encoder.dtype == torch.float16
    assert np.isfinite(sample(loaded)).all()
    with pytest.raises((OSError, ValueError)):
        LatentPipeline.from_pretrained(tmp_path / "fp16", variant="no-such-variant")
