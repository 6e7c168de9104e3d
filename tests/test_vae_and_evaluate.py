"""Stage-1 VAE training (``training/train_vae.py``) and the prompt-following evaluation (``training/evaluate.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm.data.shapes import render_sample
from ldm.eval.prompt_following import evaluate_prompt_following
from ldm.eval.shapes_analyzer import prompt_accuracy
from ldm.tiny import tiny_pipeline

from conftest import load_script as load_script_at

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    return load_script_at(ROOT / "training" / f"{name}.py", name)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    script = load_script("train_vae")
    args = script.parse_args([
        "--dataset_name", "shapes", "--max_train_samples", "16", "--resolution", "32",
        "--cache_dir", str(out / "hf-cache"), "--block_out_channels", "8", "16", "--norm_num_groups", "8",
        "--train_batch_size", "4", "--max_train_steps", "3", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "2", "--scaling_samples", "8", "--report_to", "none", "--output_dir", str(out / "vae"),
    ])
    script.main(args)
    return out / "vae"


def test_vae_training_saves_a_loadable_autoencoder_with_its_scaling_factor(vae_run):
    vae = AutoencoderKL.from_pretrained(vae_run)
    assert vae.config.block_out_channels == [8, 16] and vae.config.latent_channels == 4
    assert (vae_run / "checkpoint-2").is_dir() and (vae_run / "checkpoint-3").is_dir()
    # scaling_factor = 1 / std of posterior samples: recompute it on the same kind of images
    images = torch.stack([torch.from_numpy(np.asarray(render_sample(i, resolution=32)[0], dtype="float32"))
                          .permute(2, 0, 1) / 127.5 - 1 for i in range(16)])
    with torch.no_grad():
        std = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(1)).std().item()
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    assert vae.config.scaling_factor * std == pytest.approx(1.0, rel=0.15), (vae.config.scaling_factor, std)


def test_vae_resolution_must_fit_the_downsampling():
    script = load_script("train_vae")
    with pytest.raises(ValueError, match="multiple of the VAE factor 4"):
        script.parse_args(["--dataset_name", "shapes", "--resolution", "30", "--block_out_channels", "8", "16", "16"])


def test_prompt_accuracy_of_ground_truth_renders_is_perfect_and_of_noise_is_not():
    prompts = [render_sample(i, split="heldout")[1:] for i in range(6)]
    renders = [render_sample(i, split="heldout")[0] for i in range(6)]
    assert prompt_accuracy(renders, [a for _, a in prompts])["color_accuracy"] == 1.0
    pipe = tiny_pipeline("unet")  # random weights: its images follow no prompt
    result = evaluate_prompt_following(pipe, prompts, num_inference_steps=2, guidance_scale=2.0, batch_size=4)
    assert result.accuracy["n"] == 6 and result.latents.shape == (6, 4, 8, 8)
    assert result.accuracy["shape_accuracy"] < 0.5
    # image i always uses seed + i, whatever the batching
    again = evaluate_prompt_following(pipe, prompts[2:4], num_inference_steps=2, guidance_scale=2.0, seed=2,
                                      batch_size=1)
    # equal up to the GEMMs' rounding, which depends on the batch size (1.3e-5 apart on an AVX2-only CPU); another
    # seed would give latents O(1) apart
    torch.testing.assert_close(again.latents, result.latents[2:4], rtol=1e-4, atol=1e-4)


def test_evaluate_script_writes_json_and_grid_and_skips_fid_offline(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_pipeline("dit").save_pretrained(model)
    script = load_script("evaluate")
    report = script.main(script.parse_args([
        "--model", str(model), "--num_prompts", "5", "--steps", "2", "--guidance_scale", "3",
        "--fid", "--output", str(tmp_path / "eval.png"),
    ]))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == report and report["n"] == 5 and report["steps"] == 2 and report["guidance_scale"] == 3
    assert {"color_accuracy", "shape_accuracy", "background_accuracy"} <= set(report)
    assert report["fid"] is None and "FID skipped" in capsys.readouterr().err
    from PIL import Image

    assert Image.open(tmp_path / "eval.png").size == (8 * 64, 64)


def test_inspect_denoiser_rows_composite_alpha_and_keep_the_sampled_image(saved_pipes, tmp_path, capsys):
    """``training/inspect_denoiser.py``: the real row is the alpha-composited image, the ``known`` / ``sampled`` rows
    sit at the asked / nearest trajectory timesteps, and the final row is exactly the pipeline's own sample with the
    same seeds (watching the trajectory does not change it); one --prompt per --image is required."""
    from PIL import Image

    from pipelines import LatentPipeline

    script = load_script("inspect_denoiser")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 30, 30, 255)  # a red square on a transparent ground
    Image.fromarray(rgba).save(tmp_path / "square.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    args = script.parse_args(["--model", saved_pipes["unet"], "--image", str(tmp_path / "square.png"), "--prompt",
                              "a red square", "--image", str(tmp_path / "grey.png"), "--prompt", "grey",
                              "--timesteps", "100", "900", "--steps", "5", "--guidance_scale", "3",
                              "--output", str(tmp_path / "inspect.png")])
    rows = script.main(args)
    assert list(rows)[:4] == ["real", "vae round trip", "known 100", "known 900"]
    assert len(rows) == 7 and all(r.shape == (2, 3, 64, 64) for r in rows.values())
    assert rows["real"][0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # transparent -> white
    assert rows["real"][0, 0, 32, 32] > 0.5 and rows["real"][0, 1, 32, 32] < -0.5
    pipe = LatentPipeline.from_pretrained(saved_pipes["unet"])
    again = pipe(["a red square", "grey"], num_inference_steps=5, guidance_scale=3, output_type="pt",
                 generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    torch.testing.assert_close(rows["sampled, final"], again.float() * 2 - 1)
    sampled = [int(k.split()[1]) for k in list(rows)[4:6]]  # from noise down, each a timestep of the run
    assert sampled == sorted(sampled, reverse=True) and set(sampled) <= set(pipe.scheduler.timesteps.tolist())
    assert Image.open(tmp_path / "inspect.png").size == (2 * 64, 7 * 64)
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--image", "a.png", "--image", "b.png", "--prompt", "a"])
    assert "one --prompt per --image" in capsys.readouterr().err


def test_inspect_denoiser_restarted_rows_run_from_the_noised_render_and_end_at_its_two_limits(saved_pipes, tmp_path):
    """A restart level below every timestep is the VAE round trip; one at the first timestep is plain sampling from
    the render's latent noised there; one between differs from both and repeats exactly. ``--data_dir`` takes the
    emoji imagefolder's Noto base renders with their second caption and writes each row's PSNR next to the PNG."""
    from PIL import Image

    from ldm.latents import encode_posterior, sample_posterior, to_denoiser_space
    from pipelines import LatentPipeline

    script = load_script("inspect_denoiser")
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(["a fox face", "a red apple", "a tent"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [prompt.split()[-1], prompt], "style": "Twemoji" if i == 2
                     else "Noto", "variant": 0})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "restart.png"
    args = script.parse_args(["--model", saved_pipes["unet"], "--data_dir", str(tmp_path / "data"), "--timesteps",
                              "--restart_timesteps", "-1", "500", "999", "--steps", "5", "--guidance_scale", "3",
                              "--output", str(out)])
    got = script.main(args)
    assert list(got) == ["real", "vae round trip", "sampled, final", "restarted -1", "restarted 500", "restarted 999"]
    torch.testing.assert_close(got["restarted -1"], got["vae round trip"])
    images, prompts = script.load_renders(str(tmp_path / "data"), 32, 0, 64)
    assert sorted(prompts) == ["a fox face", "a red apple"] and torch.equal(images, got["real"])  # Noto ones only
    pipe = LatentPipeline.from_pretrained(saved_pipes["unet"])
    pipe.set_progress_bar_config(disable=True)
    latents = to_denoiser_space(sample_posterior(encode_posterior(pipe.vae, got["real"]), "mean", None), pipe.vae)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(5)
    first = pipe.scheduler.add_noise(latents, noise, pipe.scheduler.timesteps[:1].expand(2))
    plain = pipe(prompts, num_inference_steps=5, guidance_scale=3, latents=first, output_type="pt").images
    torch.testing.assert_close(got["restarted 999"], plain.float() * 2 - 1)
    middle = script.restart(pipe, latents, noise, prompts, 500, 5, 3.0)
    torch.testing.assert_close(middle, got["restarted 500"])
    for end in ("restarted -1", "restarted 999"):
        assert (middle - got[end]).abs().max() > 1e-3
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["images"] == 2 and list(report["psnr_db"]) == list(got)[1:]
    vae_psnr = script.psnr(got["vae round trip"], got["real"])
    assert report["psnr_db"]["vae round trip"] == pytest.approx(vae_psnr, abs=0.01)
    with pytest.raises(ValueError, match="no Noto base renders"):
        script.load_renders(str(tmp_path / "empty"), 4, 0, 64)


def test_inspect_denoiser_psnr_of_a_known_error():
    script = load_script("inspect_denoiser")
    real = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    assert script.psnr(real + 0.1, real) == pytest.approx(10 * np.log10(400), abs=1e-4)
