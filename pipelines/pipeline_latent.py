"""``LatentPipeline``: text-to-image sampling with a frozen VAE, a frozen CLIP text encoder and an ldm denoiser.

    prompt --CLIPTokenizer/CLIPTextModel--> tokens (B, 77, D_txt) + mask (B, 77)
    noise (B, C, h, w) --[denoiser + scheduler.step] x num_inference_steps--> latents
    latents / scaling_factor + shift_factor --AutoencoderKL.decode--> images (B, 3, H, W)

Classifier-free guidance runs the conditional and unconditional (negative-prompt) branches in one batch of 2B.
A guidance-distilled student (``denoiser.config.guidance_embedding``) takes ``guidance_scale`` as an input instead and
runs one batch of B per step.
"""

from __future__ import annotations

import copy
import inspect
import logging
import numbers
import os
import threading
from typing import Any, Callable

import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler, UnCLIPScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

import ldm  # noqa: F401  (registers every ldm model/scheduler module so saved pipelines resolve)
from ldm.guidance import combine
from ldm.latents import decode, vae_scale_factor

from .folder_checks import (check_complete, check_config_sizes, check_local_folder, check_model_index,
                            find_unreadable_weights, pickle_only_weights)

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# a fast tokenizer keeps its padding/truncation settings in shared Rust state that each call rewrites: two threads
# tokenizing with different settings race (one gets the other's padding), so every call here holds this lock
_TOKENIZER_LOCK = threading.Lock()


def _takes(module, argument: str) -> bool:
    """Whether a denoiser's forward takes ``argument``: ldm's take ``guidance``, diffusers' U-Nets do not."""
    return argument in inspect.signature(module.forward).parameters


def _is_text(value) -> bool:
    """A str, or a list or tuple of str: what ``prompt`` and ``negative_prompt`` accept."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value))


def _call_state(pipe) -> threading.local:
    """The pipeline's per-thread call state (created on first use)."""
    state = pipe.__dict__.get("_ldm_call_state")
    if state is None:
        state = pipe.__dict__.setdefault("_ldm_call_state", threading.local())
    return state


def _per_call(name: str, default=None) -> property:
    """A pipeline attribute that lives in the calling thread's state."""
    return property(lambda self: getattr(_call_state(self), name, default),
                    lambda self, value: setattr(_call_state(self), name, value))


class LatentPipeline(DiffusionPipeline):
    r"""Text-to-image pipeline for latent diffusion with an ldm U-Net or DiT denoiser.

    Components:
        vae (`AutoencoderKL`): frozen image <-> latent autoencoder; its config gives ``scaling_factor`` (and
            ``shift_factor`` when present).
        text_encoder (`CLIPTextModel`): frozen text encoder; its hidden size must equal the denoiser's
            ``cross_attention_dim``.
        tokenizer (`CLIPTokenizer`): tokenizer of the text encoder (``model_max_length`` tokens, usually 77).
        denoiser (`ldm.UNetModel` or `ldm.DiTModel`): predicts epsilon, x0 or v (``scheduler.config.prediction_type``),
            optionally with a learned-range variance in its second half of channels.
        scheduler (`SchedulerMixin`): any diffusers scheduler (DDPM, DDIM, DPM-Solver, ...) or ldm's
            ``ProgressiveDistillationScheduler``.
    """

    model_cpu_offload_seq = "text_encoder->denoiser->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        denoiser: torch.nn.Module | None,
        scheduler: SchedulerMixin | None,
    ):
        """Any component may be ``None`` (as in diffusers): a pipeline of only the text encoder and tokenizer
        encodes prompts, one without them samples from precomputed ``prompt_embeds``."""
        super().__init__()
        self._check_components(vae, text_encoder, tokenizer, denoiser)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, denoiser=denoiser, scheduler=scheduler
        )
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @staticmethod
    def _check_components(vae, text_encoder, tokenizer, denoiser) -> None:
        """The pairs of components that must agree (each check runs when both are present)."""
        if text_encoder is not None and denoiser is not None:
            LatentPipeline._check_text_width(text_encoder, denoiser)
        if vae is not None and denoiser is not None and vae.config.latent_channels != denoiser.config.in_channels:
            raise ValueError(
                f"The VAE makes {vae.config.latent_channels}-channel latents but the denoiser takes "
                f"in_channels={denoiser.config.in_channels}; they must match."
            )
        if tokenizer is not None and text_encoder is not None and \
                tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
            raise ValueError(
                f"tokenizer.model_max_length={tokenizer.model_max_length} exceeds the text encoder's "
                f"{text_encoder.config.max_position_embeddings} positions; ship a tokenizer_config.json with "
                f"model_max_length={text_encoder.config.max_position_embeddings}."
            )

    @staticmethod
    def _check_text_width(text_encoder, denoiser) -> None:
        text_width = text_encoder.config.hidden_size
        cross_width = denoiser.config.cross_attention_dim
        if text_width != cross_width:
            raise ValueError(
                f"The text encoder's hidden size is {text_width} but the denoiser cross-attends to "
                f"cross_attention_dim={cross_width}. Use a text encoder of width {cross_width}, or build/train the "
                f"denoiser with cross_attention_dim={text_width}."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "LatentPipeline":
        """Load from a local folder or a Hub id (``save_pretrained`` layout).

        Accepts the keyword arguments of ``DiffusionPipeline.from_pretrained`` (``dtype`` (one dtype or a dict per
        component with a ``"default"``), ``variant``, ``revision``, ``local_files_only``, component overrides such as
        ``scheduler=...``). Weights are read from ``*.safetensors``; a component saved only as a pickle (``.bin``,
        ``save_pretrained(..., safe_serialization=False)``) falls back to torch's weights-only unpickler with a
        warning, and a pickle that holds anything but tensors (one that would run code) is refused with an
        ``OSError`` naming the file. A missing local folder, or a missing or damaged weights file, raises ``OSError``
        naming it.
        """
        path = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        check_local_folder(path)
        check_model_index(path)
        check_config_sizes(path, kwargs.get("variant"))
        pickles = pickle_only_weights(path)
        if pickles:
            logger.warning("%s has no safetensors weights for %s; loading the pickled .bin files with torch's "
                           "weights-only unpickler (tensors only, no code). Re-save with safe_serialization=True.",
                           path, ", ".join(sorted(pickles)))
        kwargs.setdefault("use_safetensors", None if pickles else True)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except Exception as err:
            bad = find_unreadable_weights(path)
            if bad is None:
                raise
            raise OSError(f"Cannot load the weights file {bad[0]}: {bad[1]}") from err
        check_complete(pipe, path, kwargs.get("variant"))
        return pipe

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str = "pytorch_lora_weights.safetensors", **kwargs) -> None:
        """Load LoRA adapters of the denoiser (as saved by ``train_t2i.py --lora_rank`` or
        ``denoiser.save_lora_adapter``) from a folder, Hub id or state dict; safetensors only. Several adapters can
        be loaded under different ``adapter_name``s and mixed with :meth:`set_adapters`."""
        kwargs.setdefault("use_safetensors", True)
        self.denoiser.load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=None,
                                        adapter_name=adapter_name, weight_name=weight_name, **kwargs)

    # the rest of diffusers' pipeline LoRA API, on the denoiser (peft); call-time strength:
    # pipe(..., cross_attention_kwargs={"scale": 0.5})
    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Activate these adapters with these weights (one weight for all, or one each)."""
        self.denoiser.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return self.denoiser.active_adapters()

    def disable_lora(self) -> None:
        self.denoiser.disable_lora()

    def enable_lora(self) -> None:
        self.denoiser.enable_lora()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        self.denoiser.delete_adapters(adapter_names)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None):
        """Merge the active adapters (times ``lora_scale``) into the denoiser's weights: no LoRA cost per step."""
        self.denoiser.fuse_lora(lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        """Take fused adapters back out of the weights (exactly, up to float rounding)."""
        self.denoiser.unfuse_lora()

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter: the denoiser is its base model again."""
        self.denoiser.unload_lora()

    # ------------------------------------------------------------------ properties
    # Per-call state, read (and set: diffusers' callbacks assign pipe._guidance_scale) as in diffusers, kept per
    # thread, so one pipeline serves many threads: each call also samples with its own copy of the scheduler.
    _guidance_scale = _per_call("guidance_scale")
    _guidance_rescale = _per_call("guidance_rescale")
    _num_timesteps = _per_call("num_timesteps")
    _interrupt = _per_call("interrupt", False)
    _cross_attention_kwargs = _per_call("cross_attention_kwargs")
    guidance_scale = property(lambda self: self._guidance_scale)
    guidance_rescale = property(lambda self: self._guidance_rescale)
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)
    cross_attention_kwargs = property(lambda self: self._cross_attention_kwargs)

    @property
    def _sampler(self):
        """The scheduler of the running call (a per-call copy of ``self.scheduler``), else ``self.scheduler``."""
        return getattr(_call_state(self), "scheduler", None) or self.scheduler

    @property
    def guidance_distilled(self) -> bool:
        """True for a student with classifier-free guidance folded in (one denoiser forward per step)."""
        return bool(getattr(self.denoiser.config, "guidance_embedding", False))

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0 and not self.guidance_distilled

    @property
    def default_num_inference_steps(self) -> int:
        """The steps a call without ``num_inference_steps`` takes: a distilled scheduler's own count, else 50."""
        return int(getattr(self.scheduler.config, "num_distilled_steps", None) or 50)

    @property
    def latent_multiple(self) -> int:
        """Pixel height/width must be multiples of this: VAE factor x the denoiser's own divisor (patch size, ...)."""
        return self.vae_scale_factor * getattr(self.denoiser, "sample_divisor", 1)

    # ------------------------------------------------------------------ text
    def _tokenize(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """list of B prompts -> input ids (B, L), attention mask (B, L); warns about truncation."""
        max_len = self.tokenizer.model_max_length
        with _TOKENIZER_LOCK:
            full = self.tokenizer(prompts, truncation=False, verbose=False).input_ids
            enc = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                                 return_tensors="pt")
        for prompt, ids in zip(prompts, full):
            if len(ids) > max_len:
                logger.warning(
                    "The prompt %r is %d tokens long but the text encoder takes %d: the last %d tokens (%r) were "
                    "dropped. Shorten the prompt to keep them.", prompt[:60], len(ids), max_len, len(ids) - max_len,
                    self.tokenizer.decode(ids[max_len - 1 : -1]),
                )
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode prompts to (B * n, L, D) embeddings and (B * n, L) masks, plus the negative branch when guiding.

        ``prompt_embeds`` given without a mask attend to every token; given embeddings never touch the text encoder
        (a pipeline without one samples from them). The embeddings come back in the denoiser's dtype, so any mix of
        component dtypes works (a bf16 denoiser with a float32 text encoder, ...).
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._encode_texts(
                [prompt] if isinstance(prompt, str) else list(prompt), device)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] * len(prompt_embeds) if isinstance(negative_prompt, str) else \
                list(negative_prompt)
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_texts(negatives, device)
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long,
                                                        device=device)
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self._per_image(x, num_images_per_prompt, device) for x in
            (prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask))
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode_texts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("This pipeline has no text encoder/tokenizer: pass `prompt_embeds` (and "
                             "`negative_prompt_embeds` when guiding) instead of prompts.")
        ids, mask = self._tokenize(prompts, device)
        return self.text_encoder(ids)[0], mask

    def _per_image(self, x: torch.Tensor | None, num_images_per_prompt: int, device) -> torch.Tensor | None:
        """Repeat each row ``num_images_per_prompt`` times; embeddings (3 dims) in the denoiser's dtype."""
        if x is None:
            return None
        if x.ndim == 3:
            dtype = self.denoiser.dtype if self.denoiser is not None else x.dtype
            x = x.to(dtype=dtype)
        return x.to(device).repeat_interleave(num_images_per_prompt, dim=0)

    # ------------------------------------------------------------------ checks
    def _check_size(self, height: int, width: int) -> None:
        """Multiples of the latent multiple; a warning far (> 2x either way) from the trained size."""
        multiple = self.latent_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor {self.vae_scale_factor} x denoiser "
                f"divisor {multiple // self.vae_scale_factor}); got {height}x{width}. Try "
                f"{max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)}."
            )
        trained = self.denoiser.config.sample_size * self.vae_scale_factor
        if max(height, width) > 2 * trained or min(height, width) < trained / 2:
            logger.warning("This denoiser was trained at %dx%d pixels; %dx%d is far from it and usually gives "
                           "repeated or broken patterns. Sample at (or near) %dx%d.", trained, trained, height, width,
                           trained, trained)

    def check_values(self, height, width, guidance_scale, eta, guidance_rescale, timesteps, **tensors) -> None:
        """Sizes are positive ints; guidance_scale, eta and guidance_rescale finite and in range; custom timesteps a
        strictly descending list of training timesteps; the given tensors finite. A ``ValueError`` says which."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive int (pixels), got {value!r}.")
        checks = (("guidance_scale", guidance_scale, -100.0, 100.0), ("eta", eta, 0.0, 1.0),
                  ("guidance_rescale", guidance_rescale, 0.0, 1.0))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.")
        for name, tensor in tensors.items():
            if tensor is not None and not torch.is_tensor(tensor):
                raise ValueError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"`{name}` holds NaN or inf values; pass finite tensors.")
        if timesteps is not None:
            steps = timesteps.tolist() if torch.is_tensor(timesteps) else list(timesteps)
            top = self.scheduler.config.num_train_timesteps
            if (not steps or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < top
                                 for t in steps)
                    or any(a <= b for a, b in zip(steps, steps[1:]))):
                raise ValueError(f"`timesteps` must be a non-empty, strictly descending list of ints in [0, {top - 1}]"
                                 f", got {steps[:8]}{'...' if len(steps) > 8 else ''}.")

    def check_inputs(
        self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
        num_inference_steps, timesteps, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs,
    ) -> None:
        self._check_size(height, width)
        self._check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if timesteps is None:
            max_steps = self._sampler.config.num_train_timesteps
            if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= max_steps:
                raise ValueError(
                    f"num_inference_steps must be an integer between 1 and the {max_steps} training timesteps, "
                    f"got {num_inference_steps!r}."
                )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not available; "
                f"choose from {self._callback_tensor_inputs}."
            )

    def _check_text_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
        """Prompts are a str or a non-empty list of str, embeddings (B, L, D) tensors of the denoiser's width, and
        negative prompts match the prompts' batch."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a `prompt` (str or list of str) or `prompt_embeds`.")
        if prompt is not None:
            if not _is_text(prompt):
                raise ValueError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
            if not isinstance(prompt, str) and len(prompt) == 0:
                raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not torch.is_tensor(embeds) or embeds.ndim != 3):
                raise ValueError(f"`{name}` must be a (batch, tokens, width) tensor, got "
                                 f"{tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__}.")
        if negative_prompt is not None and not _is_text(negative_prompt):
            raise ValueError(f"`negative_prompt` must be a str or a list of str, got {type(negative_prompt).__name__}.")
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if self.guidance_distilled and (negative_prompt is not None or negative_prompt_embeds is not None):
            logger.warning("This denoiser has classifier-free guidance folded in (one forward per step, no "
                           "unconditional branch): the negative prompt is ignored.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch} prompts; pass one "
                f"negative prompt per prompt, or a single string for all."
            )
        if negative_prompt_embeds is not None and prompt_embeds is not None and \
                negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
            )
        if prompt_embeds is not None and prompt_embeds.shape[-1] != self.denoiser.config.cross_attention_dim:
            raise ValueError(
                f"`prompt_embeds` have width {prompt_embeds.shape[-1]} but the denoiser expects "
                f"{self.denoiser.config.cross_attention_dim}."
            )

    # ------------------------------------------------------------------ latents
    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise (B, C, H / f, W / f), scaled by the scheduler's ``init_noise_sigma`` (flow-matching
        schedulers have none: their path starts at unit noise)."""
        shape = (batch_size, self.denoiser.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt); "
                "pass one generator per image or a single one."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self._sampler, "init_noise_sigma", 1.0)

    def _set_timesteps(self, num_inference_steps: int, timesteps: list[int] | None, device) -> torch.Tensor:
        """Configure the scheduler with a step count or explicit ``timesteps``; return its (descending) timesteps."""
        if timesteps is None:
            self._sampler.set_timesteps(num_inference_steps, device=device)
        else:
            if "timesteps" not in inspect.signature(self._sampler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(self._sampler).__name__} does not accept custom `timesteps`; pass num_inference_steps."
                )
            self._sampler.set_timesteps(timesteps=timesteps, device=device)
        return self._sampler.timesteps

    def _scheduler_samples_learned_variance(self) -> bool:
        """True when ``scheduler.step`` samples with the denoiser's learned variance: DDPM-style schedulers with
        ``variance_type`` "learned"/"learned_range" then get the (B, 2C, h, w) [prediction, variance] output.

        Other schedulers (DDIM, Euler, ... also when ``from_config`` copied a stray ``variance_type``) get the
        prediction alone.
        """
        variance_type = getattr(self._sampler.config, "variance_type", None)
        if variance_type not in ("learned", "learned_range"):
            return False
        if isinstance(self._sampler, (DDPMScheduler, DDPMParallelScheduler, UnCLIPScheduler)):
            return True
        latent_channels = self.denoiser.config.in_channels
        if "variance_type" in inspect.signature(type(self._sampler).__init__).parameters and latent_channels != 3:
            name = type(self._sampler).__name__
            raise ValueError(
                f"{name} with variance_type={variance_type!r} keeps only the first 3 channels of the model output "
                f"(diffusers assumes RGB pixels), which breaks {latent_channels}-channel latents. Create it with "
                f"variance_type=None, e.g. {name}.from_config(pipe.scheduler.config, variance_type=None); the "
                f"pipeline drops the learned variance for schedulers that do not sample with it."
            )
        return False

    def _scheduler_step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self._sampler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) images in [-1, 1] (``ldm.latents.decode``)."""
        return decode(self.vae, latents)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int | None = None, timesteps: list[int] | None = None,
        guidance_scale: float | None = None, negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None, negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text; returns ``ImagePipelineOutput`` (PIL list, array or tensor) or a 1-tuple.

        Args:
            prompt: one prompt or a list; ``""`` samples unconditionally.
            height, width: pixels, multiples of ``self.latent_multiple`` (default: the trained size).
            num_inference_steps: sampling steps (default 50, or the step count a distilled scheduler was made for).
            timesteps: explicit descending timesteps, for schedulers whose ``set_timesteps`` accepts them.
            guidance_scale: classifier-free guidance s (``ldm.guidance.combine``; <= 1 disables it). Default: the
                scheduler's ``guidance_scale`` (guidance-distilled students record theirs), else 7.5.
            negative_prompt: prompt(s) for the unconditional branch (default: the empty caption).
            num_images_per_prompt: images per prompt. eta: DDIM eta (0 = deterministic; others ignore it).
            generator: one torch generator, or one per image. latents: initial noise (B * n, C, h, w) to use.
            prompt_embeds, negative_prompt_embeds: precomputed (B, L, D) text embeddings, optional (B, L) masks.
            output_type: "pil", "np" (B, H, W, 3 floats in [0, 1]), "pt" (B, 3, H, W in [0, 1]) or "latent".
            return_dict: an ``ImagePipelineOutput`` (else a tuple). guidance_rescale: phi of Lin et al. 2024 (0 = off).
            cross_attention_kwargs: ``{"scale": s}`` scales LoRA for this call; the rest goes to the processors.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step; returned
                tensors replace the pipeline's. ``callback_on_step_end_tensor_inputs``: the tensors it gets
                (default ``["latents"]``; also ``prompt_embeds``, ``negative_prompt_embeds``).
        """
        height, width, num_inference_steps, guidance_scale = self._defaults(height, width, num_inference_steps,
                                                                            guidance_scale)
        callback_on_step_end_tensor_inputs = getattr(callback_on_step_end, "tensor_inputs", None) or \
            callback_on_step_end_tensor_inputs or ["latents"]
        self.check_values(height, width, guidance_scale, eta, guidance_rescale, timesteps, latents=latents,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          num_inference_steps, timesteps, num_images_per_prompt, output_type,
                          callback_on_step_end_tensor_inputs)
        self._warn_untrained_guidance(guidance_scale)
        self._guidance_scale, self._guidance_rescale, self._interrupt = guidance_scale, guidance_rescale, False
        device = self._execution_device

        text = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
        )
        timesteps = self._set_timesteps(num_inference_steps, timesteps, device)
        latents = self.prepare_latents(len(text[0]), height, width, self.denoiser.dtype, device, generator, latents)
        self._cross_attention_kwargs = cross_attention_kwargs
        latents = self._denoise(latents, timesteps, text, self._scheduler_step_kwargs(generator, eta),
                                callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self._finish(latents, output_type, return_dict)

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Final latents -> the requested output; non-finite latents are an error, not a black image."""
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("Sampling produced non-finite latents (NaN or inf): the denoiser or a step-end callback "
                             "returned NaN/inf (e.g. fp16 overflow: try bfloat16 or float32).")
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        _call_state(self).scheduler = None
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _warn_untrained_guidance(self, guidance_scale: float) -> None:
        """A guidance-distilled student warns when asked for a scale outside the range its fold trained on."""
        trained = getattr(self.scheduler.config, "guidance_scale_range", None)
        if self.guidance_distilled and trained and not trained[0] <= guidance_scale <= trained[1]:
            logger.warning("guidance_scale %g is outside the range this student was distilled for (%g to %g): its "
                           "guidance embedding never saw it, so expect images unlike either end of the range.",
                           guidance_scale, trained[0], trained[1])

    def _defaults(self, height, width, num_inference_steps, guidance_scale) -> tuple:
        """Unset sizes: the denoiser's trained size; steps: a distilled scheduler's own count, else 50; guidance:
        the scheduler's ``guidance_scale`` (guidance-distilled students record theirs), else 7.5. Also gives the call
        its own copy of the scheduler (its timesteps and step buffers), so calls from several threads are
        independent."""
        _call_state(self).scheduler = copy.deepcopy(self.scheduler)
        height = self.denoiser.config.sample_size * self.vae_scale_factor if height is None else height
        width = self.denoiser.config.sample_size * self.vae_scale_factor if width is None else width
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = getattr(self.scheduler.config, "guidance_scale", None) or 7.5
        return height, width, num_inference_steps, guidance_scale

    def _denoise(self, latents, timesteps, text: tuple, step_kwargs: dict, callback_on_step_end,
                 callback_on_step_end_tensor_inputs: list[str]) -> torch.Tensor:
        """The sampling loop: a guided prediction and a scheduler step per timestep, then the step-end callback.

        ``text`` is (prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask) from ``encode_prompt``.
        """
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = text
        learned_variance = self._scheduler_samples_learned_variance()
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((latents.shape[0],), float(self.guidance_scale), device=latents.device)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                pred = self._guided_prediction(latents, t, prompt_embeds, prompt_mask, negative_prompt_embeds,
                                               negative_mask, guidance, learned_variance)
                latents = self._sampler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        return latents

    def _guided_prediction(self, latents, t, prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask,
                           guidance, learned_variance: bool) -> torch.Tensor:
        """The denoiser's prediction (B, C, h, w) at ``t``, classifier-free guided when guiding; with
        ``learned_variance`` the conditional branch's variance is appended (B, 2C, h, w)."""
        latent_channels = self.denoiser.config.in_channels
        if self.do_classifier_free_guidance:
            context = torch.cat([negative_prompt_embeds, prompt_embeds])
            mask = torch.cat([negative_mask, prompt_mask])
            model_input = torch.cat([latents, latents])
        else:
            context, mask, model_input = prompt_embeds, prompt_mask, latents
        if hasattr(self._sampler, "scale_model_input"):  # flow-matching schedulers do not scale the input
            model_input = self._sampler.scale_model_input(model_input, t)
        t_batch = t.expand(model_input.shape[0]) if torch.is_tensor(t) else t
        extra = {"guidance": guidance} if _takes(self.denoiser, "guidance") else {}
        output = self.denoiser(model_input, t_batch, encoder_hidden_states=context, encoder_attention_mask=mask,
                               cross_attention_kwargs=self._cross_attention_kwargs, return_dict=False, **extra)[0]
        pred, variance = output[:, :latent_channels], output[:, latent_channels:]
        if self.do_classifier_free_guidance:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = combine(pred_uncond, pred_cond, self.guidance_scale)
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale=self.guidance_rescale)
            variance = variance.chunk(2)[1]  # the conditional branch's variance
        if not learned_variance:
            return pred
        if variance.shape[1] != latent_channels:
            raise ValueError(
                f"The scheduler has variance_type={self._sampler.config.variance_type!r} but the "
                "denoiser predicts no variance; build it with learned_sigma=True or use a fixed variance."
            )
        return torch.cat([pred, variance], dim=1)
