"""Building blocks shared by the training scripts (``training/train_t2i.py``, ``training/distill.py``).

Kept here, not in the scripts, so each script reads as the algorithm it implements.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- accelerate
def multi_process_without_accelerator() -> bool:
    """True for ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs: accelerate then needs
    ``cpu=True`` to form a gloo process group (otherwise every process would train alone)."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def make_accelerator(output_dir: str | Path, gradient_accumulation_steps: int = 1, mixed_precision: str | None = None,
                     report_to: str = "tensorboard", logging_dir: str = "logs", seed: int = 0, streaming: bool = False):
    """An ``Accelerator`` with a seedable sampler (resumable data order), trackers under ``output_dir/logging_dir``,
    quiet logging on non-main processes and the global seed set; ``output_dir`` exists and holds no leftovers of an
    interrupted checkpoint save.

    Every process reads its own batches (``dispatch_batches=False``): accelerate's dispatching would concatenate the
    batches on the main process and cannot carry the captions (strings). For ``streaming`` data the processes' epochs
    can end at different batches (a data set with at least one file per process is split by file), so gradient
    accumulation then syncs every ``gradient_accumulation_steps`` batches only, not also at an epoch's end.
    """
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration,
                                  set_seed)

    output_dir = Path(output_dir)
    accelerator = Accelerator(
        cpu=multi_process_without_accelerator(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=gradient_accumulation_steps,
                                                                sync_with_dataloader=not streaming),
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed, dispatch_batches=False),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        for name in ("train_t2i", "distill", "ldm", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    set_seed(seed)
    if accelerator.is_main_process:
        from .checkpointing import remove_incomplete

        output_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(output_dir)
    accelerator.wait_for_everyone()
    return accelerator


def tracker_config(args) -> dict:
    """A script's arguments for the trackers and ``training_args.json``: scalars as they are, anything else as a
    string, the Hub token left out."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in vars(args).items() if k != "hub_token"}


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype for frozen models under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The CPU generator of one micro-step on one process: every random draw of a step comes from it, so a resumed
    run repeats exactly the draws an uninterrupted one makes."""
    import numpy as np

    state = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)  # stable across Python versions


def check_in_sync(accelerator, model) -> None:
    """Fail loudly if the processes hold different weights (a broken data-parallel set-up)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = accelerator.gather(checksum[None].to(accelerator.device))
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"The processes ended with different weights (checksums {gathered.tolist()}).")
    logger.info("Weights identical on all %d processes (checksum %.10g)", accelerator.num_processes,
                float(gathered[0]))


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all processes get the same answer)."""
    return bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all())


def nan_error(output_dir: str | Path, step: int, loss: torch.Tensor) -> RuntimeError:
    """The error a run stops with when its loss stops being finite (nothing is saved after it)."""
    from .checkpointing import list_checkpoints

    found = list_checkpoints(output_dir)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
    return RuntimeError(
        f"The loss became {loss.item()} (non-finite) at step {step + 1}; training stopped without saving, {last}. "
        "Resume from it with a lower --learning_rate or --max_grad_norm, or bf16 instead of fp16."
    )


def make_optimizer(params, learning_rate: float, use_8bit_adam: bool = False, betas=(0.9, 0.999),
                   weight_decay: float = 1e-2, eps: float = 1e-8):
    """AdamW, or bitsandbytes' AdamW8bit."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)


# ---------------------------------------------------------------------------------------------- models
def load_frozen_components(pretrained: str | None, vae: str | None = None, text_encoder: str | None = None,
                           tokenizer: str | None = None, revision: str | None = None):
    """VAE, text encoder and tokenizer, frozen and in eval mode.

    Each comes from its own folder/Hub id when given, else from the ``vae/``, ``text_encoder/``, ``tokenizer/``
    subfolders of ``pretrained`` (a pipeline). The tokenizer defaults to the text encoder's folder.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    def source(explicit, subfolder):
        if explicit:
            return explicit, ""  # transformers wants "" (not None) for "no subfolder"
        if pretrained is None:
            raise ValueError(f"No {subfolder}: give --{subfolder} or --pretrained_model_name_or_path.")
        return pretrained, subfolder

    path, sub = source(vae, "vae")
    vae_model = AutoencoderKL.from_pretrained(path, subfolder=sub, revision=revision, use_safetensors=True)
    path, sub = source(text_encoder, "text_encoder")
    text_model = CLIPTextModel.from_pretrained(path, subfolder=sub, revision=revision, use_safetensors=True)
    path, sub = source(tokenizer or text_encoder, "tokenizer")
    tok = CLIPTokenizer.from_pretrained(path, subfolder=sub, revision=revision)
    if tok.model_max_length > text_model.config.max_position_embeddings:
        raise ValueError(f"The tokenizer in {path} has model_max_length={tok.model_max_length}; add a "
                         f"tokenizer_config.json with model_max_length={text_model.config.max_position_embeddings}.")
    for model in (vae_model, text_model):
        model.requires_grad_(False).eval()
    return vae_model, text_model, tok


def load_pipeline_denoiser(pretrained: str, revision: str | None = None, **overrides):
    """The denoiser of a saved ``LatentPipeline`` (folder or Hub id), with optional config overrides."""
    import ldm
    from pipelines import LatentPipeline

    folder = pretrained if os.path.isdir(pretrained) else LatentPipeline.download(pretrained, revision=revision)
    _, class_name = json.loads(Path(folder, "model_index.json").read_text())["denoiser"]
    cls = getattr(ldm, class_name, None)
    if cls is None:
        raise ValueError(f"{pretrained}: the denoiser class {class_name!r} is not an ldm denoiser.")
    return cls.from_pretrained(folder, subfolder="denoiser", use_safetensors=True, **overrides)


# ---------------------------------------------------------------------------------------------- data
class LatentBatcher:
    """A data batch -> (latents (B, C, h, w) scaled for the denoiser, text tokens (B, L, D), mask (B, L)).

    Works on raw batches (``pixel_values``, ``captions``: runs the frozen VAE and text encoder) and on cached ones
    (``latent_params``, ``prompt_embeds``, ``prompt_mask``). The random draws (flip, posterior sample) come from the
    step generator in the same order either way, so caching does not change what a run trains on.
    """

    def __init__(self, vae, text_encoder, tokenizer, random_flip: bool, latents_mode: str = "posterior"):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.random_flip, self.latents_mode = random_flip, latents_mode
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator):
        from .data.latent_cache import encode_text, sample_latents

        cached = "latent_params" in batch
        n = len(batch["prompt_embeds"] if cached else batch["pixel_values"])
        flip = torch.rand(n, generator=generator) < 0.5 if self.random_flip else None
        if cached:
            params = batch["latent_params"]
            if flip is not None:
                params = torch.where(flip[:, None, None, None].to(params.device), batch["latent_params_flip"], params)
            embeds = batch["prompt_embeds"].to(self.text_encoder.dtype)
            mask = batch["prompt_mask"].long()
        else:
            pixels = batch["pixel_values"]
            if flip is not None:
                pixels = torch.where(flip[:, None, None, None].to(pixels.device), pixels.flip(-1), pixels)
            params = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters
            embeds, mask = encode_text(self.tokenizer, self.text_encoder, batch["captions"])
        # contiguous: the VAE returns channels-last latents, cached ones are not; the same memory format keeps the
        # denoiser's kernels, and so the weights, bitwise identical with and without the cache
        latents = ((sample_latents(params, self.latents_mode, generator) - self.shift) * self.scaling).contiguous()
        return latents, embeds, mask.to(latents.device)


def make_train_dataloader(accelerator, data_args, vae, text_encoder, tokenizer, batch_size: int,
                          cache_latents: bool = False, cache_dir: str | None = None, random_flip: bool = False,
                          num_workers: int = 0):
    """Checked (and optionally cached) training data as a DataLoader, plus the Counter of skipped rows."""
    from .data.image_caption import prepare_training_dataset
    from .data.latent_cache import cache_latents_and_text

    with accelerator.main_process_first():
        dataset, collator, skipped = prepare_training_dataset(data_args)
        if cache_latents:
            dataset = cache_latents_and_text(dataset, collator, vae, text_encoder, tokenizer, cache_dir, random_flip)
    # several processes on a stream with fewer files than processes: each reads the whole stream and keeps its own
    # batches of every round; drop_last stops accelerate from padding the ragged last round with repeated rows
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=not data_args.streaming,
        collate_fn=None if cache_latents else collator, num_workers=num_workers,
        drop_last=data_args.streaming and accelerator.num_processes > 1,
    )
    return loader, skipped
