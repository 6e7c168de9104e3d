"""LatentPipeline behaviour: save/load round trips, schedulers, guidance, outputs, callbacks, determinism, and
equality with a hand-written diffusers sampling loop."""

from __future__ import annotations

import copy
import json
import os
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldm import DiTModel, UNetModel
from ldm.tiny import tiny_dit, tiny_pipeline, tiny_scheduler, tiny_unet
from pipelines import LatentPipeline

from conftest import PROMPT, SIZE, assert_different, gen, run_python, sample, with_components

pytestmark = pytest.mark.usefixtures("single_thread")

LATENT = SIZE // 8  # latent height/width of a SIZE-pixel image (tiny VAE factor 8)
DENOISER_CLASSES = {"unet": UNetModel, "dit": DiTModel}


def kind_of(pipe: LatentPipeline) -> str:
    return "unet" if isinstance(pipe.denoiser, UNetModel) else "dit"


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(pipe, tmp_path):
    kind = kind_of(pipe)
    pipe.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LatentPipeline"
    assert index["denoiser"] == [f"ldm.models.{kind}", DENOISER_CLASSES[kind].__name__]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]

    files = [os.path.relpath(os.path.join(root, f), tmp_path) for root, _, fs in os.walk(tmp_path) for f in fs]
    weights = [f for f in files if not f.endswith((".json", ".txt"))]
    assert sorted(weights) == sorted([
        os.path.join("denoiser", "diffusion_pytorch_model.safetensors"),
        os.path.join("text_encoder", "model.safetensors"),
        os.path.join("vae", "diffusion_pytorch_model.safetensors"),
    ]), f"only safetensors weight files may be written, got {sorted(files)}"

    loaded = LatentPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.denoiser) is DENOISER_CLASSES[kind]
    assert type(loaded.scheduler) is type(pipe.scheduler)
    np.testing.assert_array_equal(sample(loaded, guidance_scale=5.0), sample(pipe, guidance_scale=5.0))


FRESH_PROCESS_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
from pipelines import LatentPipeline
for kind, folder, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    pipe = LatentPipeline.from_pretrained(folder)
    assert type(pipe.denoiser).__module__ == f"ldm.models.{kind}", type(pipe.denoiser)
    image = pipe("a red fox", num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(out, image)
"""


def test_from_pretrained_in_fresh_process(saved_pipes, tmp_path):
    """Loading needs only the installed packages: nothing from the test process or the working directory."""
    args = []
    for kind, folder in saved_pipes.items():
        args += [kind, folder, str(tmp_path / f"{kind}.npy")]
    code = "import sys; sys.argv += " + repr(args) + "\n" + textwrap.dedent(FRESH_PROCESS_SCRIPT)
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind, folder in saved_pipes.items():
        here = LatentPipeline.from_pretrained(folder)
        here.set_progress_bar_config(disable=True)
        expected = sample(here, guidance_scale=5.0)
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}.npy"), expected)


# ---------------------------------------------------------------------------------------------- schedulers
def test_ddpm_ddim_dpm_solver(pipe):
    images = {
        "ddim": sample(pipe, num_inference_steps=3),
        "ddpm": sample(with_components(pipe, scheduler=tiny_scheduler("ddpm")), num_inference_steps=3),
        "dpm": sample(with_components(pipe, scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)),
                      num_inference_steps=3),
    }
    for name, image in images.items():
        assert image.shape == (1, SIZE, SIZE, 3), name
        assert np.isfinite(image).all(), name
    assert_different(images["ddim"], images["ddpm"])
    assert_different(images["ddim"], images["dpm"])
    assert_different(images["ddpm"], images["dpm"])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_learned_range_variance(kind, unet_pipe):
    build = tiny_unet if kind == "unet" else tiny_dit
    denoiser = build(learned_sigma=True)
    learned = with_components(unet_pipe, denoiser=denoiser,
                              scheduler=tiny_scheduler("ddpm", variance_type="learned_range"))
    fixed = with_components(unet_pipe, denoiser=denoiser, scheduler=tiny_scheduler("ddpm"))
    image = sample(learned, num_inference_steps=3)
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    # same noise, same denoiser: only the reverse-process variance differs, so the predicted variance is used
    assert_different(image, sample(fixed, num_inference_steps=3))
    latents = sample(learned, num_inference_steps=3, output_type="latent")
    assert latents.shape == (1, 4, LATENT, LATENT)  # the variance channels do not leak into the latents


def test_learned_sigma_model_with_swapped_schedulers(unet_pipe):
    """A model trained with learned-range DDPM, sampled with DDIM/Euler/DPM-Solver made by ``from_config``."""
    learned_config = tiny_scheduler("ddpm", variance_type="learned_range").config
    fixed_config = tiny_scheduler("ddpm").config
    pipe = with_components(unet_pipe, denoiser=tiny_unet(learned_sigma=True))
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        # the copied variance_type means nothing to these schedulers: they get the prediction alone
        swapped = sample(with_components(pipe, scheduler=cls.from_config(learned_config)), num_inference_steps=3)
        plain = sample(with_components(pipe, scheduler=cls.from_config(fixed_config)), num_inference_steps=3)
        assert np.isfinite(swapped).all()
        np.testing.assert_array_equal(swapped, plain, err_msg=cls.__name__)
    # DPM-Solver takes variance_type as "keep model_output[:, :3]" (RGB pixels): refused with the fix in the message
    dpm = with_components(pipe, scheduler=DPMSolverMultistepScheduler.from_config(learned_config))
    with pytest.raises(ValueError, match=r"variance_type=None, e\.g\. DPMSolverMultistepScheduler\.from_config"):
        sample(dpm)
    dpm = with_components(pipe, scheduler=DPMSolverMultistepScheduler.from_config(learned_config, variance_type=None))
    assert np.isfinite(sample(dpm, num_inference_steps=3)).all()


def test_learned_range_without_learned_sigma_raises(pipe):
    learned = with_components(pipe, scheduler=tiny_scheduler("ddpm", variance_type="learned_range"))
    with pytest.raises(ValueError, match="learned_sigma=True"):
        sample(learned)


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("guidance_scale, factor", [(5.0, 2), (1.0, 1), (0.5, 1)])
def test_guidance_doubles_denoiser_batch(pipe, guidance_scale, factor):
    batches = []
    handle = pipe.denoiser.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        sample(pipe, prompt=["a red fox", "a blue square"], guidance_scale=guidance_scale, num_inference_steps=3)
    finally:
        handle.remove()
    assert batches == [2 * factor] * 3


def test_guidance_changes_output(pipe):
    plain = sample(pipe, guidance_scale=1.0)
    guided = sample(pipe, guidance_scale=5.0)
    assert_different(plain, guided)
    assert_different(guided, sample(pipe, guidance_scale=5.0, negative_prompt="blurry"))
    assert_different(guided, sample(pipe, guidance_scale=5.0, guidance_rescale=0.7))
    # an empty negative prompt is the default unconditional branch
    np.testing.assert_array_equal(guided, sample(pipe, guidance_scale=5.0, negative_prompt=""))
    # without guidance the negative prompt is not used at all
    np.testing.assert_array_equal(plain, sample(pipe, guidance_scale=1.0, negative_prompt="blurry"))


def test_prompt_changes_output(pipe):
    assert_different(sample(pipe, prompt="a red fox"), sample(pipe, prompt="a blue square"), min_diff=1e-5)


def test_prompt_embeds_equal_prompts(pipe):
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, "blurry")
    assert embeds.shape == neg.shape == (1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    assert mask.shape == (1, pipe.tokenizer.model_max_length) and mask.sum() == len(pipe.tokenizer(PROMPT).input_ids)
    from_embeds = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                       negative_prompt_attention_mask=neg_mask, num_inference_steps=2, height=SIZE, width=SIZE,
                       generator=gen(0), output_type="np").images
    np.testing.assert_allclose(from_embeds, sample(pipe, negative_prompt="blurry"), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- outputs
def test_num_images_per_prompt(pipe):
    prompts = ["a red fox", "a blue square"]
    images = sample(pipe, prompt=prompts, num_images_per_prompt=2)
    assert images.shape == (4, SIZE, SIZE, 3)
    for i in range(4):
        for j in range(i):
            assert_different(images[i], images[j])
    # images are ordered prompt-major, [fox, fox, square, square]: with one generator per image, image k equals
    # the single-image run of its prompt with generator k
    batch = sample(pipe, prompt=prompts, num_images_per_prompt=2, generator=[gen(k) for k in range(4)])
    for k, prompt in enumerate([prompts[0], prompts[0], prompts[1], prompts[1]]):
        np.testing.assert_allclose(batch[k], sample(pipe, prompt=prompt, seed=k)[0], rtol=0, atol=1e-5)


def test_output_types(pipe):
    pil = sample(pipe, prompt=["a red fox", "a blue square"], output_type="pil")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (SIZE, SIZE) and im.mode == "RGB" for im in pil)

    arr = sample(pipe, prompt=["a red fox", "a blue square"], output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, SIZE, SIZE, 3) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0.01

    pt = sample(pipe, prompt=["a red fox", "a blue square"], output_type="pt")
    assert torch.is_tensor(pt) and pt.shape == (2, 3, SIZE, SIZE)

    latent = sample(pipe, prompt=["a red fox", "a blue square"], output_type="latent")
    assert torch.is_tensor(latent) and latent.shape == (2, 4, LATENT, LATENT)

    # all four describe the same images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    assert np.abs(np.asarray(pil[1], dtype=np.float32) - arr[1] * 255).max() <= 0.5 + 1e-3
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.decode_latents(latent), output_type="np")
    np.testing.assert_allclose(decoded, arr, atol=1e-6)


def test_return_dict_false(pipe):
    out = pipe(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, generator=gen(0), output_type="np",
               return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    np.testing.assert_array_equal(out[0], sample(pipe))


def test_callback_on_step_end(pipe):
    steps, calls = 3, []

    def record(p, i, t, tensors):
        assert p is pipe
        calls.append((i, int(t), sorted(tensors), {k: v.clone() for k, v in tensors.items()}))
        return {}

    latents = sample(pipe, num_inference_steps=steps, output_type="latent", callback_on_step_end=record,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert [c[0] for c in calls] == list(range(steps))
    reference = copy.deepcopy(pipe.scheduler)  # the call sampled with its own copy of the scheduler
    reference.set_timesteps(steps)
    assert [c[1] for c in calls] == reference.timesteps.tolist()
    assert all(c[2] == ["latents", "negative_prompt_embeds", "prompt_embeds"] for c in calls)
    assert calls[0][3]["prompt_embeds"].shape == (1, pipe.tokenizer.model_max_length, 32)
    torch.testing.assert_close(calls[-1][3]["latents"], latents)  # the latents after each step
    assert_different(calls[0][3]["latents"], calls[1][3]["latents"])

    # default tensor inputs: only the latents
    only_latents = []
    sample(pipe, callback_on_step_end=lambda p, i, t, kw: only_latents.append(sorted(kw)) or {})
    assert only_latents == [["latents"], ["latents"]]


def test_callback_replaces_latents(pipe):
    def zero_last(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == p.num_timesteps - 1 else {}

    latents = sample(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last)
    assert torch.count_nonzero(latents) == 0
    # the decoded image then depends on nothing but the zero latents: any prompt and seed give the same image
    a = sample(pipe, prompt="a red fox", seed=0, callback_on_step_end=zero_last)
    b = sample(pipe, prompt="a blue square", seed=1, callback_on_step_end=zero_last)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert_different(sample(pipe, prompt="a red fox", seed=0), a)

    # replacing the latents at an earlier step changes where the later steps start from
    def zero_first(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 0 else {}

    assert_different(sample(pipe, num_inference_steps=3, callback_on_step_end=zero_first),
                     sample(pipe, num_inference_steps=3))


def test_unknown_callback_tensor_input_raises(pipe):
    with pytest.raises(ValueError, match=r"\['noise_pred'\].*latents"):
        sample(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents", "noise_pred"])


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_image_different_seed_different_image(pipe):
    np.testing.assert_array_equal(sample(pipe, seed=0), sample(pipe, seed=0))
    assert_different(sample(pipe, seed=0), sample(pipe, seed=1))
    # also with a stochastic scheduler (DDPM draws noise at every step from the generator)
    ddpm = with_components(pipe, scheduler=tiny_scheduler("ddpm"))
    np.testing.assert_array_equal(sample(ddpm, seed=3), sample(ddpm, seed=3))
    assert_different(sample(ddpm, seed=3), sample(ddpm, seed=4))


def test_generator_list(pipe):
    images = sample(pipe, num_images_per_prompt=2, generator=[gen(7), gen(8)])
    assert images.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(images, sample(pipe, num_images_per_prompt=2, generator=[gen(7), gen(8)]))
    np.testing.assert_allclose(images[1], sample(pipe, seed=8)[0], rtol=0, atol=1e-5)
    assert_different(images[0], images[1])


def test_generator_list_wrong_length_raises(pipe):
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        sample(pipe, num_images_per_prompt=2, generator=[gen(0), gen(1), gen(2)])


# ---------------------------------------------------------------------------------------------- vs diffusers
@torch.no_grad()
def test_ddim_cfg_equals_hand_written_diffusers_loop(pipe):
    """Same math as a textbook diffusers loop: DDIMScheduler steps on eps_u + s (eps_c - eps_u)."""
    steps, scale = 4, 4.0
    ours = sample(pipe, num_inference_steps=steps, guidance_scale=scale, negative_prompt="blurry",
                  output_type="latent")

    tokenizer, text_encoder, denoiser = pipe.tokenizer, pipe.text_encoder, pipe.denoiser
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def encode(text):
        enc = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return text_encoder(enc.input_ids)[0], enc.attention_mask

    cond, cond_mask = encode(PROMPT)
    uncond, uncond_mask = encode("blurry")
    context, mask = torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])
    latents = torch.randn((1, 4, LATENT, LATENT), generator=gen(0)) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_uncond, eps_cond = denoiser(model_input, t, context, encoder_attention_mask=mask).sample.chunk(2)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample

    assert len(scheduler.timesteps) == steps
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("denoiser_dtype, text_dtype, vae_dtype", [
    (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32, torch.float32),
])
def test_any_mix_of_component_dtypes_samples_close_to_float32(kind, denoiser_dtype, text_dtype, vae_dtype):
    """A half-precision denoiser with a float32 text encoder (and every other mix) samples, close to float32."""
    reference = sample(tiny_pipeline(kind), num_inference_steps=4)
    pipe = tiny_pipeline(kind)
    pipe.denoiser.to(denoiser_dtype)
    pipe.text_encoder.to(text_dtype)
    pipe.vae.to(vae_dtype)
    images = sample(pipe, num_inference_steps=4)
    assert np.isfinite(images).all()
    assert np.abs(images - reference).max() < 0.1
