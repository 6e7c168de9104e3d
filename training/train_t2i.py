#!/usr/bin/env python
"""Train a text-to-image latent diffusion denoiser (U-Net or DiT) with accelerate.

    accelerate launch training/train_t2i.py \
        --pretrained_model_name_or_path <pipeline with vae/ text_encoder/ tokenizer/> --denoiser dit \
        --denoiser_config dit-b/2 --dataset_name <hub id> --resolution 256 --train_batch_size 32 \
        --prediction_type v_prediction --snr_gamma 5 --cache_latents --use_ema --output_dir out

Runs unchanged on one CPU (``python training/train_t2i.py ...``) and on many GPUs/machines (DDP, FSDP, DeepSpeed
via ``accelerate config``). The VAE and text encoder stay frozen; only the denoiser (or its LoRA adapters) trains.
Every random draw of a step (timesteps, noise, flips, caption dropout, posterior samples) comes from a generator
seeded by (seed, micro-step, process), so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

logger = logging.getLogger("train_t2i")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ldm.data.image_caption import add_data_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="pipeline folder or Hub id giving vae/, text_encoder/, tokenizer/ (and denoiser/ to fine-tune)")
    g.add_argument("--vae", default=None, help="AutoencoderKL folder or Hub id (overrides the pipeline's)")
    g.add_argument("--text_encoder", default=None, help="CLIPTextModel folder or Hub id (overrides the pipeline's)")
    g.add_argument("--tokenizer", default=None,
                   help="CLIPTokenizer folder (default: --text_encoder's, else the pipeline's)")
    g.add_argument("--revision", default=None)
    g.add_argument("--denoiser", choices=["unet", "dit"], default=None,
                   help="train a new denoiser of this kind from scratch (default: fine-tune the pipeline's)")
    g.add_argument("--denoiser_config", default=None,
                   help="config.json of the new denoiser, or a size: dit-s/2, dit-b/2, ... or unet-s, unet-b, unet-l")
    g = add_data_arguments(p, None, "training image size (default: the VAE's sample_size)", streaming=True,
                           balance=True)
    g.add_argument("--cache_latents", action="store_true",
                   help="precompute VAE latents and text embeddings once (map-style data only)")
    g.add_argument("--cache_latents_mode", choices=["posterior", "mean"], default="posterior",
                   help="train on posterior samples (fresh each step) or on the posterior mean")
    g.add_argument("--latents_cache_dir", default=None, help="where the cache goes (default: <output_dir>/cache)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_schedule", choices=["linear", "scaled_linear", "squaredcos_cap_v2"], default="linear")
    g.add_argument("--beta_start", type=float, default=1e-4)
    g.add_argument("--beta_end", type=float, default=0.02)
    g.add_argument("--rescale_betas_zero_snr", action="store_true")
    g.add_argument("--prediction_type", choices=["epsilon", "sample", "v_prediction", "flow"], default="epsilon",
                   help="flow: flow matching (rectified flow, x_s = (1 - s) x0 + s eps, target eps - x0), sampled "
                        "with FlowMatchEulerDiscreteScheduler")
    g.add_argument("--weighting_scheme", choices=["uniform", "logit_normal", "mode"], default=None,
                   help="density of the training noise levels (default: logit_normal for flow, else uniform)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean of the logit")
    g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: std of the logit")
    g.add_argument("--mode_scale", type=float, default=1.29, help="mode: SD3's scale")
    g.add_argument("--timestep_shift", default="1.0",
                   help="flow: shift s -> shift s / (1 + (shift - 1) s) of training and sampling levels; a number, "
                        "or 'auto' for SD3's sqrt(pixels) / 256 at --resolution")
    g.add_argument("--variance_type", choices=["fixed_small", "fixed_large", "learned_range"], default=None,
                   help="reverse-process variance (default fixed_small; learned_range = --learned_variance)")
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (5 is typical)")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--input_perturbation", type=float, default=0.0,
                   help="gamma of input perturbation (Ning et al. 2023): the noisy input is built from eps + gamma xi, "
                        "the target from eps, so the denoiser learns from inputs a little off the forward process as "
                        "its own samples are; 0.1 in the paper and in diffusers' scripts; 0: off")
    g.add_argument("--learned_variance", action="store_true",
                   help="learn the reverse-process variance (learned range) with the hybrid loss of improved DDPM")
    g.add_argument("--vlb_weight", type=float, default=1e-3, help="lambda of L_simple + lambda L_vlb")
    g.add_argument("--caption_dropout", type=float, default=0.1,
                   help="probability of an empty caption, for classifier-free guidance")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=16, help="per device")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="multiply the lr by batch x accumulation x processes")
    g.add_argument("--lr_scheduler", default="constant",
                   help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (GPU)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate config's")
    g.add_argument("--vae_dtype", choices=["fp32", "weight"], default="fp32",
                   help="the frozen VAE in float32 (default) or in the mixed-precision dtype")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lora_rank", type=int, default=None,
                   help="train only LoRA adapters of this rank on the denoiser's attention projections")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="ldm-model")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--validation_steps", type=int, default=500)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    g.add_argument("--validation_loss_every", type=int, default=None,
                   help="every N steps, the loss on fixed held-out batches with fixed seeds (ldm.validation_loss)")
    g.add_argument("--validation_data_dir", default=None,
                   help="held-out imagefolder for the validation loss (default: the data's validation split)")
    g.add_argument("--validation_loss_samples", type=int, default=64)
    g.add_argument("--validation_loss_buckets", type=int, default=4, help="noise-level bands of the breakdown")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one); never written to disk")
    g.add_argument("--license", default="apache-2.0")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    from ldm.train_loop import check_counts

    check_counts(args)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give --dataset_name or --train_data_dir.")
    if args.pretrained_model_name_or_path is None and (args.vae is None or args.text_encoder is None):
        raise ValueError("Give --pretrained_model_name_or_path, or both --vae and --text_encoder.")
    if args.denoiser is None and args.pretrained_model_name_or_path is None:
        raise ValueError("Say which denoiser to train from scratch (--denoiser unet|dit), or fine-tune the one in "
                         "--pretrained_model_name_or_path.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming data has no length: give --max_train_steps.")
    if args.streaming and args.cache_latents:
        raise ValueError("--cache_latents needs a map-style data set; drop --streaming or --cache_latents.")
    if args.lora_rank is not None and args.denoiser is not None:
        raise ValueError("--lora_rank fine-tunes an existing denoiser: drop --denoiser and pass "
                         "--pretrained_model_name_or_path.")
    if args.lora_rank is not None and args.use_ema:
        raise ValueError("--use_ema with --lora_rank is not supported; train LoRA without EMA.")
    if args.learned_variance and args.lora_rank is not None:
        raise ValueError("--learned_variance changes the denoiser's output layer; it cannot be trained with LoRA.")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if args.input_perturbation < 0:
        raise ValueError(f"--input_perturbation is a noise scale >= 0 (0.1 is usual), got {args.input_perturbation}")
    _check_objective(args)
    _check_validation_loss(args)
    if args.snr_gamma is not None and args.rescale_betas_zero_snr:
        logger.warning("--snr_gamma with --rescale_betas_zero_snr: min-SNR weights the x0 error by min(SNR, gamma), "
                       "which is ~0 near the zero-SNR end where the text decides layout and colour; prompt "
                       "following can suffer. Drop --snr_gamma to keep the plain %s loss there.",
                       args.prediction_type)


def _check_objective(args: argparse.Namespace) -> None:
    """The diffusion flags that go together (flow matching vs the DDPM family, the variance)."""
    if args.variance_type == "learned_range":
        args.learned_variance = True
    elif args.variance_type is not None and args.learned_variance:
        raise ValueError(f"--learned_variance is --variance_type learned_range, not {args.variance_type}.")
    args.weighting_scheme = args.weighting_scheme or ("logit_normal" if args.prediction_type == "flow" else "uniform")
    if args.timestep_shift != "auto":
        try:
            float(args.timestep_shift)
        except ValueError:
            raise ValueError(f"--timestep_shift must be a number or 'auto', got {args.timestep_shift!r}") from None
    if args.prediction_type != "flow":
        if args.timestep_shift not in ("1", "1.0"):
            raise ValueError("--timestep_shift is for --prediction_type flow (the DDPM family shifts with "
                             "--beta_schedule / --rescale_betas_zero_snr).")
        return
    for flag, value in (("--snr_gamma", args.snr_gamma), ("--rescale_betas_zero_snr", args.rescale_betas_zero_snr),
                        ("--learned_variance / --variance_type", args.learned_variance or args.variance_type)):
        if value:
            raise ValueError(f"{flag} belongs to the DDPM objectives; flow matching has no beta schedule, SNR weights "
                             "or reverse variance (its path reaches pure noise at s = 1). Use --weighting_scheme "
                             "and --timestep_shift to shape it.")


def _check_validation_loss(args: argparse.Namespace) -> None:
    """The validation loss needs held-out data: a folder, the imagefolder's ``validation/`` split or a data set's."""
    if args.validation_loss_every is None:
        return
    for flag in ("validation_loss_every", "validation_loss_samples", "validation_loss_buckets"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.validation_data_dir is None and args.train_data_dir is not None and \
            not (Path(args.train_data_dir) / "validation" / "metadata.jsonl").is_file():
        raise ValueError(f"--validation_loss_every needs held-out data: {args.train_data_dir} has no validation/ "
                         "split folder (with a metadata.jsonl). Pass --validation_data_dir, an imagefolder of "
                         "images kept out of training.")


def validation_data_args(args):
    """The ``DataArgs`` of the held-out data (its ``validation`` split; see ``_check_validation_loss``)."""
    from ldm.data.image_caption import DataArgs

    base = dataclasses.replace(DataArgs.from_args(args), streaming=False, max_train_samples=None, balance_by=None)
    if args.validation_data_dir is not None:
        return dataclasses.replace(base, dataset_name=None, train_data_dir=args.validation_data_dir)
    if args.dataset_name == "shapes":
        return dataclasses.replace(base, max_train_samples=args.validation_loss_samples)
    return base


def timestep_shift(args, resolution: int) -> float:
    from ldm.flow_matching import resolution_shift

    return resolution_shift(resolution, resolution) if args.timestep_shift == "auto" else float(args.timestep_shift)


# ---------------------------------------------------------------------------------------------------- build
def build_denoiser(args, vae, text_encoder):
    """A new denoiser sized for these latents and text tokens, or the pipeline's own denoiser."""
    import ldm
    from ldm.components import load_pipeline_denoiser
    from ldm.latents import vae_scale_factor

    if args.denoiser is None:
        denoiser = load_pipeline_denoiser(args.pretrained_model_name_or_path, args.revision)
        if args.learned_variance and not denoiser.config.learned_sigma:
            raise ValueError("--learned_variance needs a denoiser with learned_sigma=True; this one has none.")
    else:
        cls = ldm.UNetModel if args.denoiser == "unet" else ldm.DiTModel
        config: dict = {}
        if args.denoiser_config and os.path.isfile(args.denoiser_config):
            config = {k: v for k, v in json.loads(Path(args.denoiser_config).read_text()).items()
                      if not k.startswith("_")}
        elif args.denoiser_config:
            sizes = ldm.dit_size_config if args.denoiser == "dit" else ldm.unet_size_config
            config = sizes(args.denoiser_config)
        else:
            names = "dit-s/2, dit-b/2, ..." if args.denoiser == "dit" else "unet-s, unet-b, unet-l"
            raise ValueError(f"--denoiser {args.denoiser} needs a size: --denoiser_config {names} or a config.json.")
        factor = vae_scale_factor(vae)
        if args.resolution % factor:
            raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE factor {factor}.")
        config.update(sample_size=args.resolution // factor, in_channels=vae.config.latent_channels,
                      cross_attention_dim=text_encoder.config.hidden_size, learned_sigma=args.learned_variance,
                      out_channels=None)
        denoiser = cls(**config)
    width = text_encoder.config.hidden_size
    if denoiser.config.cross_attention_dim != width:
        raise ValueError(f"The denoiser cross-attends to width {denoiser.config.cross_attention_dim} but the text "
                         f"encoder is {width} wide.")
    return denoiser


def check_resolution(args, vae) -> None:
    """``--resolution`` defaults to the size the VAE was trained at; another size gets a warning."""
    trained = getattr(vae.config, "sample_size", None)
    if isinstance(trained, (list, tuple)):
        trained = trained[0]
    if args.resolution is None:
        args.resolution = int(trained or 256)
        logger.info("--resolution not given: %d, the VAE's sample_size", args.resolution)
    elif trained and args.resolution != trained:
        logger.warning("--resolution %d but the VAE was trained at %d px: its latents (and so the denoiser) may be "
                       "poor at %d px. Pass --resolution %d, or a VAE trained at this size.", args.resolution,
                       trained, args.resolution, trained)


def build_models(args, accelerator):
    """The frozen VAE, text encoder and tokenizer on the device, the denoiser to train (LoRA adapters, gradient
    checkpointing) and the training objective."""
    from ldm.components import load_frozen_components
    from ldm.distributed import vae_dtype_of, weight_dtype_of
    from ldm.flow_matching import flow_scheduler
    from ldm.noise_schedules import training_scheduler
    from ldm.training_step import Objective

    vae, text_encoder, tokenizer = load_frozen_components(
        args.pretrained_model_name_or_path, args.vae, args.text_encoder, args.tokenizer, args.revision)
    check_resolution(args, vae)
    denoiser = build_denoiser(args, vae, text_encoder)
    if args.prediction_type == "flow":
        scheduler = flow_scheduler(args.num_train_timesteps, timestep_shift(args, args.resolution))
    else:
        scheduler = training_scheduler(args.num_train_timesteps, args.beta_schedule, args.beta_start, args.beta_end,
                                       args.prediction_type, args.rescale_betas_zero_snr, args.learned_variance,
                                       args.variance_type)
    objective = Objective(scheduler, args.prediction_type, args.snr_gamma, args.learned_variance, args.vlb_weight,
                          args.noise_offset, args.caption_dropout, args.weighting_scheme, args.logit_mean,
                          args.logit_std, args.mode_scale, args.input_perturbation)
    weight_dtype = weight_dtype_of(accelerator)
    vae.to(accelerator.device, dtype=vae_dtype_of(accelerator, args.vae_dtype))
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.lora_rank is not None:
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                        init_lora_weights="gaussian",
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return vae, text_encoder, tokenizer, denoiser, objective


def make_ema(args, accelerator, denoiser):
    """diffusers' ``EMAModel`` of the denoiser, saved with every checkpoint as safetensors (None without
    ``--use_ema``)."""
    from diffusers.training_utils import EMAModel

    if not args.use_ema:
        return None
    ema = EMAModel(denoiser.parameters(), decay=args.ema_decay, model_cls=type(denoiser), model_config=denoiser.config)
    ema.to(accelerator.device)
    return ema


@dataclass
class Prepared:
    """The accelerate-prepared pieces of a run."""

    denoiser: torch.nn.Module
    optimizer: object
    loader: object
    lr_scheduler: object
    params: list
    skipped: object
    max_train_steps: int


def prepare_training(args, accelerator, denoiser, vae, text_encoder, tokenizer) -> Prepared:
    """Data, optimizer and learning-rate schedule, prepared by accelerate with the denoiser."""
    from diffusers.optimization import get_scheduler

    from ldm.data.image_caption import DataArgs
    from ldm.data.loader import make_train_dataloader
    from ldm.train_loop import make_optimizer

    data_args = DataArgs.from_args(args)
    loader, skipped = make_train_dataloader(
        accelerator, data_args, vae, text_encoder, tokenizer, args.train_batch_size, args.cache_latents,
        args.latents_cache_dir or str(Path(args.output_dir) / "cache"), args.random_flip,
        args.dataloader_num_workers)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(params, lr, args.use_8bit_adam, (args.adam_beta1, args.adam_beta2),
                               args.adam_weight_decay, args.adam_epsilon)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        batches_per_process = math.ceil(len(loader) / accelerator.num_processes)
        max_train_steps = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    return Prepared(denoiser, optimizer, loader, lr_scheduler, params, skipped, max_train_steps)


@dataclass
class Validation:
    """Called after every optimizer step: samples the validation prompts every ``--validation_steps``."""

    args: argparse.Namespace
    accelerator: object
    models: tuple  # (denoiser unwrapped, ema, vae, text_encoder, tokenizer, training scheduler)
    grids: list = field(default_factory=list)

    def __call__(self, step: int, force: bool = False) -> None:
        if self.args.validation_prompts and (force or step % self.args.validation_steps == 0):
            self.grids.append(validate(self.args, self.accelerator, *self.models, step))


# ---------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> Path:
    from ldm.data.image_caption import log_skipped
    from ldm.distributed import check_in_sync, make_accelerator, tracker_config
    from ldm.train_loop import LoopConfig, run_training
    from ldm.training_step import BatchEncoder, diffusion_step

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(output_dir, args.gradient_accumulation_steps, args.mixed_precision,
                                   args.report_to, args.logging_dir, args.seed, streaming=args.streaming)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    vae, text_encoder, tokenizer, denoiser, objective = build_models(args, accelerator)
    ema = make_ema(args, accelerator, denoiser)
    run = prepare_training(args, accelerator, denoiser, vae, text_encoder, tokenizer)
    encoder = BatchEncoder(vae, text_encoder, tokenizer, args.random_flip, args.cache_latents_mode)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_t2i", config=tracker_config(args))
        (output_dir / "training_args.json").write_text(json.dumps(tracker_config(args, json_ready=True), indent=2))
    unwrapped = accelerator.unwrap_model(run.denoiser)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("Training %s (%d of %d parameters trainable) for %d steps, %d images per step",
                type(unwrapped).__name__, sum(p.numel() for p in run.params),
                sum(p.numel() for p in unwrapped.parameters()), run.max_train_steps, total_batch)

    validation = Validation(args, accelerator, (unwrapped, ema, vae, text_encoder, tokenizer, objective.scheduler))
    hooks = [validation]
    if args.validation_loss_every:
        from ldm.validation_loss import ValidationLoss, held_out_batches

        batches = held_out_batches(validation_data_args(args), args.validation_loss_samples, args.train_batch_size)
        hooks.append(ValidationLoss(accelerator, run.denoiser, encoder, objective, batches, args.validation_loss_every,
                                    output_dir / args.logging_dir / "validation_loss.jsonl", args.seed,
                                    args.validation_loss_buckets))
    loop = LoopConfig(output_dir, run.max_train_steps, args.checkpointing_steps, args.checkpoints_total_limit,
                      args.resume_from_checkpoint, args.max_grad_norm, args.gradient_accumulation_steps, args.seed,
                      skipped=run.skipped, images_per_step=total_batch)
    step = run_training(accelerator, run.denoiser, run.optimizer, run.lr_scheduler, run.loader,
                        partial(diffusion_step, run.denoiser, encoder, objective), loop, ema=ema,
                        after_step=lambda step: [hook(step) for hook in hooks])
    if args.streaming:
        log_skipped(loop.skipped)
    if args.validation_prompts and step % args.validation_steps:
        validation(step, force=True)
    check_in_sync(accelerator, unwrapped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(args, unwrapped, ema, objective.scheduler, validation.grids[-1] if validation.grids else None,
                   step, total_batch)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


@torch.no_grad()
def validate(args, accelerator, denoiser, ema, vae, text_encoder, tokenizer, noise_scheduler, step: int):
    """Sample the validation prompts (on every process, so sharded models work); the main process saves the grid
    to ``<output_dir>/validation/step-<step>.png`` and logs it. Returns the grid's path."""
    from diffusers.utils import make_image_grid

    from ldm.noise_schedules import sampling_scheduler
    from pipelines import LatentPipeline

    if ema is not None:
        ema.store(denoiser.parameters())
        ema.copy_to(denoiser.parameters())
    denoiser.eval()
    pipe = LatentPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, denoiser=denoiser,
                          scheduler=sampling_scheduler(noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    with accelerator.autocast():
        images = pipe(args.validation_prompts, num_inference_steps=args.validation_inference_steps,
                      guidance_scale=args.validation_guidance_scale, generator=generator,
                      height=args.resolution, width=args.resolution).images
    denoiser.train()
    if ema is not None:
        ema.restore(denoiser.parameters())
    path = Path(args.output_dir) / "validation" / f"step-{step}.png"
    if accelerator.is_main_process:
        import numpy as np

        path.parent.mkdir(parents=True, exist_ok=True)
        make_image_grid(images, rows=1, cols=len(images)).save(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(i, caption=c) for i, c in
                                            zip(images, args.validation_prompts)]}, step=step)
    return path


def save_final(args, denoiser, ema, noise_scheduler, grid: Path | None, step: int, total_batch: int) -> None:
    """Save the pipeline (EMA weights when used) or the LoRA adapters, the model card, and push if asked."""
    from ldm.model_card import render_model_card
    from ldm.components import load_frozen_components
    from ldm.noise_schedules import sampling_scheduler
    from pipelines import LatentPipeline

    output_dir = Path(args.output_dir)
    scheduler = sampling_scheduler(noise_scheduler)
    lora = args.lora_rank is not None
    if lora:
        denoiser.save_lora_adapter(output_dir, weight_name="pytorch_lora_weights.safetensors")
    else:
        if ema is not None:
            ema.copy_to(denoiser.parameters())
        vae, text_encoder, tokenizer = load_frozen_components(  # fresh fp32 copies, whatever trained in
            args.pretrained_model_name_or_path, args.vae, args.text_encoder, args.tokenizer, args.revision)
        pipe = LatentPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, denoiser=denoiser.float(),
                              scheduler=scheduler)
        pipe.save_pretrained(output_dir)
    card_grid = None
    if grid is not None and grid.is_file():
        shutil.copy(grid, output_dir / "validation.png")
        card_grid = "validation.png"
    hyper = {k: v for k, v in vars(args).items() if v is not None and k not in ("hub_token", "output_dir")}
    hyper.update(total_batch_size=total_batch, trained_steps=step)
    render_model_card(
        output_dir, repo_id=args.hub_model_id or output_dir.name,
        base_model=args.pretrained_model_name_or_path if args.denoiser is None else None,
        datasets=args.dataset_name, license=args.license, tags=["lora"] if lora else None,
        hyperparameters=hyper, denoiser_class=type(denoiser).__name__,
        num_parameters=f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f}M",
        lora=lora, lora_rank=args.lora_rank, scheduler_class=type(scheduler).__name__,
        prediction_type=args.prediction_type, beta_schedule=args.beta_schedule,
        zero_snr=args.rescale_betas_zero_snr, shift=getattr(scheduler.config, "shift", None),
        example_prompt=(args.validation_prompts or ["a red fox"])[0],
        validation_image=card_grid, validation_prompts=args.validation_prompts,
    )
    logger.info("Saved %s to %s", "LoRA adapters" if lora else "the pipeline", output_dir)
    if args.push_to_hub:
        repo_id = args.hub_model_id or output_dir.name
        try:
            push_folder(output_dir, repo_id, args.hub_token)
        except Exception as err:  # offline, no token, no rights: the saved pipeline stays where it is
            raise RuntimeError(
                f"The pipeline was saved to {output_dir}, but pushing it to the Hub failed: "
                f"{type(err).__name__}: {str(err).splitlines()[0][:300]}. Push it later with "
                f"`hf upload {repo_id} {output_dir}` (or huggingface_hub.upload_folder).") from err


def push_folder(folder: Path, repo_id: str, token: str | None) -> str:
    """Upload the saved pipeline and card (not checkpoints, caches or logs) to ``repo_id``; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload ldm pipeline",
                           token=token, ignore_patterns=["checkpoint-*", ".tmp-checkpoint-*", "cache/*",
                                                         "logs/*", "validation/*", "training_args.json", ".lock"])
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return str(commit)


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("train_t2i", main, parse_args)
