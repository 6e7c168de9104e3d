"""Bad input fails early with a clear error that names the problem (DEVELOPERS.md, principle 3)."""

from __future__ import annotations

import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch

from ldm.tiny import tiny_components, tiny_dit, tiny_text_encoder
from pipelines import LatentPipeline

from conftest import RunsCode, sample, with_components

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("height, width", [(40, 32), (32, 36), (20, 20)])
def test_size_not_multiple_of_vae_factor_times_divisor(pipe, height, width):
    # tiny VAE factor 8 x (U-Net: one halving -> 2 | DiT: patch size 2) = 16
    assert pipe.latent_multiple == 16
    with pytest.raises(ValueError, match=rf"multiples of 16 .*got {height}x{width}"):
        sample(pipe, height=height, width=width)


def test_size_uses_dit_patch_size(unet_pipe):
    dit4 = with_components(unet_pipe, denoiser=tiny_dit(patch_size=4))
    assert dit4.latent_multiple == 32
    with pytest.raises(ValueError, match=r"multiples of 32 \(VAE factor 8 x denoiser divisor 4\); got 48x32"):
        sample(dit4, height=48, width=32)
    assert sample(dit4, height=64, width=32).shape == (1, 64, 32, 3)


# ---------------------------------------------------------------------------------------------- prompts
def test_empty_prompt_list(pipe):
    with pytest.raises(ValueError, match="empty list"):
        sample(pipe, prompt=[])


def test_prompt_must_be_text(pipe):
    with pytest.raises(ValueError, match="str or a list of str"):
        sample(pipe, prompt=["a red fox", 3])
    with pytest.raises(ValueError, match=r"Pass a `prompt` .* or `prompt_embeds`"):
        sample(pipe, prompt=None)


def test_negative_prompt_batch_mismatch(pipe):
    with pytest.raises(ValueError, match="`negative_prompt` has 3 entries but there are 2 prompts"):
        sample(pipe, prompt=["a red fox", "a blue square"], negative_prompt=["a", "b", "c"])


def test_long_prompt_truncated_with_warning(pipe, caplog):
    max_len = pipe.tokenizer.model_max_length  # 77 = <start> + 75 words + <end>
    assert max_len == 77
    long_prompt = " ".join(["red"] * 75 + ["fox"] * 10)  # every word is one token
    assert len(pipe.tokenizer(long_prompt).input_ids) == 87
    kept_prompt = " ".join(["red"] * 75)

    with caplog.at_level(logging.WARNING, logger="pipelines.pipeline_latent"):
        long_image = sample(pipe, prompt=long_prompt, guidance_scale=5.0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipelines.pipeline_latent"]
    assert len(warnings) == 1, warnings
    assert "87 tokens" in warnings[0] and "the last 10 tokens" in warnings[0] and "fox" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.pipeline_latent"):
        kept_image = sample(pipe, prompt=kept_prompt, guidance_scale=5.0)
    assert not [r for r in caplog.records if r.name == "pipelines.pipeline_latent"]  # exactly 77 tokens fit
    np.testing.assert_array_equal(long_image, kept_image)


# ---------------------------------------------------------------------------------------------- steps / outputs
@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_num_inference_steps_out_of_range(pipe, steps):
    with pytest.raises(ValueError, match=rf"num_inference_steps must be an integer between 1 and the 1000 .*{steps}"):
        sample(pipe, num_inference_steps=steps)


def test_num_inference_steps_bounds_are_valid(pipe):
    assert sample(pipe, num_inference_steps=1).shape == (1, 32, 32, 3)


def test_bad_output_type(pipe):
    with pytest.raises(ValueError, match="output_type must be one of"):
        sample(pipe, output_type="jpeg")


# ---------------------------------------------------------------------------------------------- components
def test_text_encoder_width_mismatch_at_construction():
    components = tiny_components("unet")
    components["text_encoder"] = tiny_text_encoder(components["tokenizer"], hidden_size=48)
    with pytest.raises(ValueError, match="hidden size is 48 but the denoiser cross-attends to cross_attention_dim=32"):
        LatentPipeline(**components)


def test_text_encoder_width_mismatch_at_load(saved_pipes, unet_pipe, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipes["unet"], folder)
    shutil.rmtree(folder / "text_encoder")
    tiny_text_encoder(unet_pipe.tokenizer, hidden_size=48).save_pretrained(folder / "text_encoder")
    with pytest.raises(ValueError, match="hidden size is 48 but the denoiser cross-attends to cross_attention_dim=32"):
        LatentPipeline.from_pretrained(folder)


WEIGHT_FILES = [
    os.path.join("denoiser", "diffusion_pytorch_model.safetensors"),
    os.path.join("text_encoder", "model.safetensors"),
    os.path.join("vae", "diffusion_pytorch_model.safetensors"),
]


@pytest.mark.parametrize("weights", WEIGHT_FILES)
def test_truncated_weights_file_raises_oserror_naming_it(saved_pipes, tmp_path, weights):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipes["unet"], folder)
    path = folder / weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError) as info:
        LatentPipeline.from_pretrained(folder)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("weights", WEIGHT_FILES)
def test_missing_weights_file_raises_oserror_naming_it(saved_pipes, tmp_path, weights):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipes["unet"], folder)
    (folder / weights).unlink()
    with pytest.raises(OSError) as info:
        LatentPipeline.from_pretrained(folder)
    message = str(info.value)
    assert os.path.basename(weights) in message and str(folder / os.path.dirname(weights)) in message


@pytest.mark.parametrize("where", ["absolute", "relative", "file"])
def test_missing_pipeline_folder(saved_pipes, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    path = {"absolute": str(tmp_path / "no-such-model"), "relative": "./no-such-model",
            "file": os.path.join(saved_pipes["unet"], "model_index.json")}[where]
    problem = "is a file, not a folder" if where == "file" else "does not exist"
    with pytest.raises(OSError, match=re.escape(f"The pipeline folder {path} {problem}")):
        LatentPipeline.from_pretrained(path)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_pickle_weights_load_weights_only_with_a_warning(kind, tmp_path, caplog):
    """A pipeline saved with ``safe_serialization=False`` (``.bin`` files) loads, as in diffusers, through torch's
    weights-only unpickler, with a warning; it samples what the original samples."""
    from ldm.tiny import tiny_pipeline

    pipe = tiny_pipeline(kind)
    pipe.save_pretrained(tmp_path, safe_serialization=False)  # transformers 5 writes the text encoder as safetensors
    for folder in ("denoiser", "vae"):
        assert not list((tmp_path / folder).glob("*.safetensors")) and list((tmp_path / folder).glob("*.bin"))
    with caplog.at_level(logging.WARNING, logger="pipelines.pipeline_latent"):
        loaded = LatentPipeline.from_pretrained(tmp_path)
    assert "weights-only unpickler" in caplog.text
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


@pytest.mark.parametrize("component", ["denoiser", "vae", "text_encoder"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(component, tmp_path):
    import pickle

    from ldm.tiny import tiny_pipeline

    tiny_pipeline("unet").save_pretrained(tmp_path, safe_serialization=False)
    for old in (tmp_path / component).glob("*.safetensors"):  # the text encoder: as an older transformers saved it
        old.unlink()
    weights = next((tmp_path / component).glob("*.bin"), tmp_path / component / "pytorch_model.bin")
    marker = tmp_path / "pwned"
    weights.write_bytes(pickle.dumps({"weight": RunsCode(f"touch {marker}")}))
    with pytest.raises(OSError, match=re.escape(str(weights)) + ".*weights-only unpickler refused it"):
        LatentPipeline.from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_size_far_from_the_trained_one_warns(caplog):
    from ldm.tiny import tiny_pipeline

    pipe = tiny_pipeline("unet")  # trained size: 8 x 8 latents x VAE factor 8 = 64 px
    with caplog.at_level(logging.WARNING, logger="pipelines.pipeline_latent"):
        sample(pipe, height=32, width=128, num_inference_steps=1)  # within 2x either way: fine
        assert "trained at" not in caplog.text
        sample(pipe, height=256, width=256, num_inference_steps=1)
    assert "This denoiser was trained at 64x64 pixels; 256x256 is far from it" in caplog.text


NAN = float("nan")


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_scale=float("inf")), "guidance_scale must be a number in"),
    (dict(guidance_scale=1e30), "guidance_scale must be a number in"),
    (dict(guidance_scale=NAN), "guidance_scale must be a number in"),
    (dict(eta=1.5), "eta must be a number in \\[0, 1\\]"), (dict(eta=-1.0), "eta must be"), (dict(eta=NAN), "eta must"),
    (dict(guidance_rescale=5.0), "guidance_rescale must be"), (dict(guidance_rescale=-1.0), "guidance_rescale must"),
    (dict(height=0), "height must be a positive int"), (dict(width=-32), "width must be a positive int"),
    (dict(height=32.0), "height must be a positive int"), (dict(height="32"), "height must be a positive int"),
    (dict(timesteps=[]), "`timesteps` must be a non-empty, strictly descending"),
    (dict(timesteps=[10, 500]), "strictly descending"), (dict(timesteps=[500, 500, 10]), "strictly descending"),
    (dict(timesteps=[2000, 10]), "strictly descending list of ints in \\[0, 999\\]"),
    (dict(timesteps=[500, -10]), "in \\[0, 999\\]"),
    (dict(negative_prompt=123), "`negative_prompt` must be a str or a list of str, got int"),
    (dict(negative_prompt=["blurry", 7]), "`negative_prompt` must be a str or a list of str"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)),
     "`prompt_embeds` must be a \\(batch, tokens, width\\) tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=[1.0]),
     "`negative_prompt_embeds` must be a torch.Tensor, got list"),
])
def test_out_of_range_and_non_finite_values_are_refused(unet_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(unet_pipe, **kwargs)


@pytest.mark.parametrize("name", ["latents", "prompt_embeds"])
def test_non_finite_tensors_are_refused(unet_pipe, name):
    import torch

    bad = {"latents": torch.full((1, 4, 4, 4), NAN),
           "prompt_embeds": torch.full((1, 77, unet_pipe.text_encoder.config.hidden_size), float("inf"))}[name]
    kwargs = {name: bad}
    if name == "prompt_embeds":
        kwargs["prompt"] = None
    with pytest.raises(ValueError, match=f"`{name}` holds NaN or inf"):
        sample(unet_pipe, **kwargs)


def test_a_callback_that_returns_nan_latents_is_an_error_not_a_black_image(unet_pipe):
    import torch

    def poison(pipe, i, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], NAN)}

    with pytest.raises(ValueError, match="non-finite latents"):
        sample(unet_pipe, callback_on_step_end=poison)


@pytest.mark.parametrize("component", ["denoiser", "vae", "text_encoder"])
def test_a_weights_file_missing_a_tensor_is_an_error_naming_it(component, tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm.tiny import tiny_pipeline

    tiny_pipeline("dit").save_pretrained(tmp_path)
    file = next((tmp_path / component).glob("*.safetensors"))
    tensors = load_file(file)
    dropped = sorted(tensors)[len(tensors) // 2]
    del tensors[dropped]
    save_file(tensors, file)
    with pytest.raises(OSError, match=re.escape(str(file)) + f".*lacks 1 of the {component}'s tensors .*"
                       + re.escape(dropped)):
        LatentPipeline.from_pretrained(tmp_path)


def test_a_diffusers_unet_works_as_the_denoiser():
    """A Stable-Diffusion-style ``UNet2DConditionModel`` has diffusers' call signature (no ``guidance``): it samples
    through LatentPipeline like an ldm denoiser."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm.tiny import TEXT_WIDTH, tiny_components

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8).eval()
    pipe = LatentPipeline(**{**tiny_components("unet"), "denoiser": unet})
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("index, message", [
    ([["diffusers", "AutoencoderKL"]], "holds a list, not an object of components"),
    ({"scheduler": ["diffusers", "AutoencoderKL"]},
     "the scheduler entry names AutoencoderKL, which is not a scheduler"),
    ({"vae": "diffusers"}, "component 'vae' is 'diffusers'; each must be \\[library, class name\\]"),
])
def test_a_malformed_model_index_is_a_clear_error(saved_pipes, tmp_path, index, message):
    import json

    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipes["unet"], folder)
    original = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index if isinstance(index, list) else {**original, **index}))
    with pytest.raises(OSError, match=message):
        LatentPipeline.from_pretrained(folder)


@pytest.mark.parametrize("kind, component, key, value, message", [
    ("unet", "denoiser", "block_out_channels", [100000, 200000], "describes .* of shape .* the weights hold"),
    ("unet", "vae", "block_out_channels", [8, 16, 16, 100000], "describes .* of shape .* the weights hold"),
    ("unet", "text_encoder", "hidden_size", 1000000, "describes .* of shape .* the weights hold"),
    ("unet", "text_encoder", "vocab_size", 10**9, "describes .* of shape .* the weights hold"),
    ("unet", "denoiser", "layers_per_block", 3000, "gives layers_per_block=3000, more layers than"),
    ("dit", "denoiser", "depth", 3000, "gives depth=3000, more layers than"),
    ("dit", "denoiser", "sample_size", 10**6, "does not describe a valid DiTModel: sample_size=1000000"),
    ("unet", "denoiser", "norm_num_groups", 7, "does not describe a valid UNetModel: .*divisible"),
])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(saved_pipes, tmp_path, kind,
                                                                             component, key, value, message):
    """An edited config.json (widths that would allocate 100 GB to 4 TB, layer counts that take minutes to build)
    is an OSError naming the file, raised from a meta-device build before anything is allocated."""
    import json

    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipes[kind], folder)
    config_file = folder / component / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    with pytest.raises(OSError, match=f"{config_file}.* {message}"):
        LatentPipeline.from_pretrained(folder)
