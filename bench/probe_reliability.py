#!/usr/bin/env python
"""The hostile-user probe of the pipeline API and of threads (issue 19): tries every case on a tiny real pipeline
and prints the counts: tried / ran as it should / clear error / silent wrong / raw crash.

    OMP_NUM_THREADS=1 python bench/probe_reliability.py

A case is *valid* (it must run and give finite images) or *invalid* (it must raise ``ValueError`` or ``OSError``
with a message). "Silent wrong": an invalid case that ran, or a valid one whose output is not finite. "Raw crash": any
other exception (a third-party traceback). The thread probe runs mixed calls on one shared pipeline from 4 threads
and compares every image with the same call run alone.
"""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VALID, INVALID = "valid", "invalid"
BASE = dict(prompt="a red fox", num_inference_steps=4, height=32, width=32, output_type="np")


def nan_callback(pipe, step, t, kwargs):
    return {"latents": kwargs["latents"] * float("nan")}


def api_cases(pipe) -> list[tuple[str, str, dict]]:
    """(name, expectation, call keyword overrides)."""
    shape = (1, 4, 4, 4)
    width = pipe.text_encoder.config.hidden_size
    cases = [(f"height={v!r}", INVALID, {"height": v}) for v in (0, -32, 31, 36, 32.0, "32")]
    cases += [(f"width={v!r}", INVALID, {"width": v}) for v in (0, -8, 20)]
    cases += [(f"num_inference_steps={v!r}", INVALID, {"num_inference_steps": v}) for v in (0, -1, 1.5, "8", 1001)]
    cases += [(f"guidance_scale={v!r}", INVALID, {"guidance_scale": v})
              for v in (float("nan"), float("inf"), 1e30, "7")]
    cases += [(f"eta={v!r}", INVALID, {"eta": v}) for v in (-1.0, 1.5, 5.0, float("nan"))]
    cases += [(f"guidance_rescale={v!r}", INVALID, {"guidance_rescale": v}) for v in (-1.0, 5.0, float("nan"))]
    cases += [(f"prompt={v!r}", INVALID, {"prompt": v}) for v in ([], 123, ["a", 1], None)]
    cases += [("negative_prompt batch mismatch", INVALID, {"prompt": ["a", "b"], "negative_prompt": ["x"] * 3}),
              ("negative_prompt=123", INVALID, {"negative_prompt": 123})]
    cases += [(f"num_images_per_prompt={v!r}", INVALID, {"num_images_per_prompt": v}) for v in (0, -1, 2.5)]
    cases += [("latents of the wrong shape", INVALID, {"latents": torch.randn(1, 4, 8, 8)}),
              ("latents with NaN", INVALID, {"latents": torch.full(shape, float("nan"))}),
              ("latents with inf", INVALID, {"latents": torch.full(shape, float("inf"))}),
              ("prompt_embeds with NaN", INVALID, {"prompt": None,
                                                   "prompt_embeds": torch.full((1, 77, width), float("nan"))}),
              ("prompt_embeds of the wrong width", INVALID, {"prompt": None, "prompt_embeds": torch.randn(1, 77, 7)}),
              ("prompt_embeds 2-D", INVALID, {"prompt": None, "prompt_embeds": torch.randn(77, width)}),
              ("prompt and prompt_embeds", INVALID, {"prompt_embeds": torch.randn(1, 77, width)}),
              ("3 generators for 1 image", INVALID, {"generator": [torch.Generator() for _ in range(3)]}),
              ("output_type='bad'", INVALID, {"output_type": "bad"}),
              ("callback returns NaN latents", INVALID, {"callback_on_step_end": nan_callback}),
              ("callback tensor input unknown", INVALID, {"callback_on_step_end": lambda p, s, t, k: {},
                                                          "callback_on_step_end_tensor_inputs": ["nope"]})]
    cases += [(f"timesteps={v!r} ({s})", INVALID, {"timesteps": v, "num_inference_steps": None, "scheduler": s})
              for v in ([1, 500, 999], [999, 500, -10], [], [5000, 10], [999, 500, 500, 1])
              for s in ("DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")]
    cases += [("timesteps with DDIM (takes none)", INVALID, {"timesteps": [999, 500, 1], "num_inference_steps": None})]
    cases += [(f"valid {k}={v!r}", VALID, {k: v}) for k, v in (
        ("guidance_scale", 7.5), ("guidance_scale", 1.0), ("guidance_scale", 0.0), ("guidance_scale", -1.0),
        ("eta", 0.5),
        ("guidance_rescale", 0.7), ("num_images_per_prompt", 2), ("prompt", ""), ("prompt", "🦊 " * 100),
        ("negative_prompt", "blurry"), ("output_type", "pil"), ("output_type", "pt"), ("output_type", "latent"),
        ("height", 48), ("latents", torch.randn(shape, dtype=torch.float64)))]
    cases += [(f"valid timesteps [999, 500, 1] ({s})", VALID,
               {"timesteps": [999, 500, 1], "num_inference_steps": None, "scheduler": s})
              for s in ("DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")]
    cases += [
              ("valid prompt_embeds", VALID, {"prompt": None, "prompt_embeds": torch.randn(1, 77, width)}),
              ("valid list of generators", VALID, {"prompt": ["a", "b"], "generator": [torch.Generator()] * 2})]
    return cases


def scheduler_cases() -> list[tuple[str, str, dict]]:
    return [(f"valid scheduler {name}", VALID, {"scheduler": name}) for name in
            ("DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
             "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler",
             "PNDMScheduler", "DEISMultistepScheduler")]


def finite(images) -> bool:
    if isinstance(images, list):  # PIL
        return all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in images)
    return bool(torch.isfinite(torch.as_tensor(np.asarray(images, dtype=np.float32))).all())


def run_case(pipe, expectation: str, overrides: dict) -> str:
    import diffusers

    call = {**BASE, "generator": torch.Generator().manual_seed(0), **overrides}
    scheduler = call.pop("scheduler", None)
    original = pipe.scheduler
    try:
        if scheduler:
            pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
        images = pipe(**{k: v for k, v in call.items() if v is not None or k == "prompt"}).images
    except (ValueError, OSError) as err:
        return "clear error" if expectation == INVALID and str(err) else "wrongly refused"
    except Exception:  # noqa: BLE001
        return "raw crash"
    finally:
        pipe.scheduler = original
    if expectation == INVALID or not finite(images):
        return "silent wrong"
    return "ran as it should"


def thread_probe(pipe, threads: int = 4, calls: int = 64) -> Counter:
    """Mixed guidance scales, step counts and schedulers on one pipeline from ``threads`` threads, each image
    compared with the same call run alone."""
    import diffusers

    kinds = [None, diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler]
    settings = [dict(guidance_scale=[1.0, 4.0, 7.5][i % 3], num_inference_steps=[3, 4, 6][(i // 3) % 3],
                     seed=i, scheduler=kinds[(i // 9) % 3]) for i in range(calls)]
    pipes = {None: pipe}
    for kind in kinds[1:]:
        other = pipe.__class__(**pipe.components)
        other.scheduler = kind.from_config(pipe.scheduler.config)
        other.set_progress_bar_config(disable=True)
        pipes[kind] = other

    def call(s):
        p = pipes[s["scheduler"]]
        return p("a red fox", height=32, width=32, output_type="np", guidance_scale=s["guidance_scale"],
                 num_inference_steps=s["num_inference_steps"],
                 generator=torch.Generator().manual_seed(s["seed"])).images

    alone = [call(s) for s in settings]
    counts = Counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(call, s) for s in settings]
        for future, expected in zip(futures, alone):
            try:
                counts["identical" if np.array_equal(future.result(), expected) else "silent wrong"] += 1
            except Exception:  # noqa: BLE001
                counts["raw crash"] += 1
    return counts


def main() -> None:
    from ldm.tiny import tiny_pipeline

    torch.set_num_threads(1)
    results = {}
    for kind in ("unet", "dit"):
        pipe = tiny_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        for name, expectation, overrides in api_cases(pipe) + scheduler_cases():
            results[(kind, name)] = run_case(pipe, expectation, overrides)
            print(f"{kind}: {name}: {results[(kind, name)]}", file=sys.stderr, flush=True)
    counts = Counter(results.values())
    print(f"pipeline API: tried {len(results)}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for (kind, name), outcome in sorted(results.items()):
        if outcome not in ("clear error", "ran as it should"):
            print(f"  {kind}: {name}: {outcome}")
    threads = thread_probe(tiny_pipeline("unet"))
    print(f"threads: {sum(threads.values())} images from 4 threads; " +
          ", ".join(f"{k} {v}" for k, v in sorted(threads.items())))


if __name__ == "__main__":
    main()
