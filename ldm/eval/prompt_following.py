"""Prompt-following evaluation of a pipeline on the shapes prompts (colour/shape/background recognised from pixels).

    result = evaluate_prompt_following(pipe, heldout_prompts(64), num_inference_steps=50, guidance_scale=5.0)
    result.accuracy["color_accuracy"], result.seconds_per_image, result.images
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .shapes_analyzer import prompt_accuracy


@dataclass
class PromptFollowingResult:
    """Accuracies (``prompt_accuracy``'s dict), the images (PIL, prompt order), latents (N, C, h, w), timing."""

    accuracy: dict[str, float]
    images: list = field(repr=False)
    latents: torch.Tensor = field(repr=False)
    seconds: float
    seconds_per_image: float


@torch.no_grad()
def evaluate_prompt_following(pipe, prompts: list[tuple[str, dict]], num_inference_steps: int | None = None,
                              guidance_scale: float | None = None, seed: int = 0, batch_size: int = 16,
                              **call_kwargs) -> PromptFollowingResult:
    """Sample one image per (caption, attributes) prompt and score it.

    Image i uses the generator seeded with ``seed + i`` whatever the batching, so two pipelines (a teacher and its
    student) sampled with the same seed start from the same noise and can be compared latent by latent.
    """
    latents, images = [], []
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        generators = [torch.Generator().manual_seed(seed + lo + i) for i in range(len(chunk))]
        out = pipe([caption for caption, _ in chunk], num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generators, output_type="latent", **call_kwargs).images
        latents.append(out.float().cpu())
        images += pipe.image_processor.postprocess(pipe.decode_latents(out), output_type="pil")
    seconds = time.perf_counter() - start
    accuracy = prompt_accuracy(images, [attrs for _, attrs in prompts])
    return PromptFollowingResult(accuracy, images, torch.cat(latents), seconds, seconds / max(1, len(prompts)))
