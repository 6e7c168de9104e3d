"""A deterministic validation loss: the training objective on the same held-out batches, with the same noise and
noise levels, at every evaluation.

Batch ``i`` of the held-out set is scored with a generator seeded ``seed + i`` (caption dropout off, the denoiser in
eval mode, under the training autocast), so the number depends on the weights alone: two runs with the same weights,
or a run and its resume, give it bit for bit, and curves of different runs on the same data are comparable. The
training weighting is left out (no min-SNR weights or offset noise, noise levels drawn uniformly whatever
``--weighting_scheme`` trains with), so runs of one objective with different weightings are measured on one scale;
the learned-variance VLB term stays, being part of what such a model predicts. The
per-sample losses are also averaged over ``buckets`` equal bands of the noise level (t / T for the DDPM family, s for
flow matching): high noise decides layout and colour, low noise the details. Losses of different objectives
(eps / v / flow) measure different targets and are not comparable with each other.

``train_t2i.py --validation_loss_every N`` logs ``val_loss`` and ``val_loss/t0.00-0.25``, ... to the trackers and
writes them to ``<output_dir>/logs/validation_loss.jsonl`` (a resumed run replaces the lines after its
checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .training_step import diffusion_step


def held_out_batches(data_args, num_samples: int, batch_size: int) -> list[dict]:
    """The first ``num_samples`` usable rows of the data's ``validation`` split, collated once into fixed batches
    (an imagefolder's ``validation/`` folder, a given folder itself, the shapes validation split, a Hub split)."""
    from .data.image_caption import prepare_training_dataset

    dataset, collator, _ = prepare_training_dataset(data_args, split="validation")
    n = min(num_samples, len(dataset))
    return [collator([dataset[i] for i in range(lo, min(lo + batch_size, n))]) for lo in range(0, n, batch_size)]


@torch.no_grad()
def validation_loss(denoiser, encoder, objective, batches: list[dict], seed: int = 0, buckets: int = 4) -> dict:
    """{"val_loss": mean, "val_loss/t<lo>-<hi>": mean per noise-level band} over ``batches`` (module docstring)."""
    # one scale for every weighting of an objective: plain MSE at uniform levels, no offset noise, input perturbation
    # or caption dropout
    objective = dataclasses.replace(objective, caption_dropout=0.0, snr_gamma=None, weighting_scheme="uniform",
                                    noise_offset=0.0, input_perturbation=0.0)
    was_training = denoiser.training
    denoiser.eval()
    losses, levels = [], []
    try:
        for i, batch in enumerate(batches):
            generator = torch.Generator(device=next(denoiser.parameters()).device).manual_seed(seed + i)
            out = diffusion_step(denoiser, encoder, objective, batch, generator)
            losses.append(out.per_sample.float().cpu())
            levels.append(out.levels.float().cpu())
    finally:
        denoiser.train(was_training)
    losses, levels = torch.cat(losses), torch.cat(levels)
    band = (levels * buckets).long().clamp(0, buckets - 1)
    result = {"val_loss": losses.mean().item()}
    for k in range(buckets):
        if (band == k).any():
            result[f"val_loss/t{k / buckets:.2f}-{(k + 1) / buckets:.2f}"] = losses[band == k].mean().item()
    return result


@dataclasses.dataclass
class ValidationLoss:
    """``after_step`` hook: every ``every`` optimizer steps, :func:`validation_loss` on every process (sharded
    models need all of them); the main process logs it and appends it to ``log_file``."""

    accelerator: object
    denoiser: torch.nn.Module
    encoder: object
    objective: object
    batches: list[dict]
    every: int
    log_file: Path
    seed: int = 0
    buckets: int = 4

    def __call__(self, step: int) -> dict | None:
        if step % self.every:
            return None
        with self.accelerator.autocast():
            result = validation_loss(self.denoiser, self.encoder, self.objective, self.batches, self.seed,
                                     self.buckets)
        if self.accelerator.is_main_process:
            self.accelerator.log(result, step=step)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            # a resumed run recomputes the steps after its checkpoint: their old lines go
            old = self.log_file.read_text().splitlines() if self.log_file.is_file() else []
            kept = [line for line in old if line.strip() and json.loads(line)["step"] < step]
            kept.append(json.dumps({"step": step, **result}))
            self.log_file.write_text("".join(line + "\n" for line in kept))
        return result
