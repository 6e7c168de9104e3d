#!/usr/bin/env python
"""Stage 1: train a diffusers ``AutoencoderKL`` (the frozen VAE of later stages) with accelerate.

    accelerate launch training/train_vae.py --dataset_name shapes --resolution 64 \
        --block_out_channels 32 64 128 --latent_channels 4 --max_train_steps 3000 --output_dir vae

Loss: L1 + MSE reconstruction of the decoded posterior sample, plus ``--kl_weight`` x KL(q(z|x) || N(0, I)), plus
``--perceptual_weight`` x LPIPS when torchmetrics and its pretrained VGG weights are available. After training,
``scaling_factor`` is set to 1 / std of the latents over ``--scaling_samples`` images, so scaled latents have unit
variance (what the denoiser's noise schedule assumes), and the VAE is saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_vae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ldm.data.image_caption import add_data_arguments
    from ldm.train_loop import add_loop_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p, 64)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_vae", default=None, help="fine-tune this AutoencoderKL instead of a new one")
    g.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128],
                   help="channels per level; the downsampling factor is 2^(levels - 1)")
    g.add_argument("--layers_per_block", type=int, default=1)
    g.add_argument("--latent_channels", type=int, default=4)
    g.add_argument("--norm_num_groups", type=int, default=8,
                   help="GroupNorm groups; keep several channels per group at the widest level (a group of one "
                        "channel normalises it alone over the image and the decoder loses absolute colour)")
    g = p.add_argument_group("loss")
    g.add_argument("--kl_weight", type=float, default=1e-6)
    g.add_argument("--mse_weight", type=float, default=1.0)
    g.add_argument("--l1_weight", type=float, default=1.0)
    g.add_argument("--perceptual_weight", type=float, default=0.0, help="LPIPS weight (needs its VGG weights)")
    g = add_loop_arguments(p, "ldm-vae", batch=32, steps=3000, learning_rate=1e-3, warmup=100, checkpointing=1000)
    g.add_argument("--lr_scheduler", default="cosine")
    g.add_argument("--scaling_samples", type=int, default=512, help="images whose latents set scaling_factor")
    args = p.parse_args(argv)
    from ldm.train_loop import check_counts

    check_counts(args)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give --dataset_name or --train_data_dir.")
    from ldm.latents import vae_scale_factor

    if args.resolution % vae_scale_factor(args.block_out_channels):
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE factor "
                         f"{vae_scale_factor(args.block_out_channels)}.")
    return args


def build_vae(args):
    from diffusers import AutoencoderKL

    if args.pretrained_vae:
        return AutoencoderKL.from_pretrained(args.pretrained_vae, use_safetensors=True)
    levels = len(args.block_out_channels)
    if any(c % args.norm_num_groups for c in args.block_out_channels):
        raise ValueError(f"--norm_num_groups {args.norm_num_groups} must divide every --block_out_channels entry "
                         f"{args.block_out_channels}")
    if args.block_out_channels[0] // args.norm_num_groups < 2:
        logger.warning("--norm_num_groups %d gives one channel per group at %d channels: each channel is normalised "
                       "alone and flat colours reconstruct poorly; use at most %d groups", args.norm_num_groups,
                       args.block_out_channels[0], args.block_out_channels[0] // 4)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups, sample_size=args.resolution,
    )


class PosteriorAutoencoder(torch.nn.Module):
    """Wraps the VAE so one ``forward`` (what DDP/FSDP hook into) encodes, samples with given noise and decodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator):
        """pixels (B, 3, R, R) -> reconstruction (B, 3, R, R), KL per sample (B,) per latent element."""
        from ldm.latents import sample_posterior

        dist = self.vae.encode(pixels).latent_dist
        z = sample_posterior(dist.parameters, "posterior", generator)
        return self.vae.decode(z).sample, dist.kl() / dist.mean[0].numel()


def perceptual_loss_fn(weight: float):
    """LPIPS (torchmetrics, VGG) when ``weight`` > 0; a clear error when its pretrained weights are unavailable."""
    if weight <= 0:
        return None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False)
    except Exception as err:  # missing package or weights that cannot be downloaded offline
        raise RuntimeError(f"--perceptual_weight needs torchmetrics' LPIPS with its pretrained VGG weights: {err}. "
                           "Install torchmetrics[image] with network access once, or use --perceptual_weight 0.")


@torch.no_grad()
def latent_scaling_factor(vae, loader, num_samples: int, device) -> float:
    """1 / std of posterior samples over about ``num_samples`` training images."""
    from ldm.latents import encode_posterior, sample_posterior

    latents = []
    seen = 0
    generator = torch.Generator().manual_seed(0)
    for batch in loader:
        z = sample_posterior(encode_posterior(vae, batch["pixel_values"]), "posterior", generator)
        latents.append(z.float().cpu())
        seen += len(z)
        if seen >= num_samples:
            break
    return float(1.0 / torch.cat(latents).std())


@dataclass
class VAELoss:
    loss: torch.Tensor
    rec: torch.Tensor
    kl: torch.Tensor

    def logs(self) -> dict[str, float]:
        return {"reconstruction": self.rec.item(), "kl": self.kl.item()}


def vae_loss(args, model: PosteriorAutoencoder, lpips, batch: dict, generator: torch.Generator) -> VAELoss:
    """Reconstruction (+ LPIPS) of a posterior sample + KL; (B, 3, R, R) pixels in [-1, 1]."""
    pixels = batch["pixel_values"]
    if args.random_flip:
        flip = (torch.rand(len(pixels), generator=generator) < 0.5).to(pixels.device)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    recon, kl = model(pixels, generator)
    rec = args.l1_weight * F.l1_loss(recon, pixels) + args.mse_weight * F.mse_loss(recon, pixels)
    kl = kl.mean()
    loss = rec + args.kl_weight * kl
    if lpips is not None:
        loss = loss + args.perceptual_weight * lpips(recon.clamp(-1, 1), pixels)
    return VAELoss(loss, rec.detach(), kl.detach())


def main(args: argparse.Namespace) -> Path:
    from diffusers.optimization import get_scheduler

    from ldm.data.image_caption import DataArgs, prepare_training_dataset
    from ldm.train_loop import LoopConfig, run_training
    from ldm.distributed import check_in_sync, make_accelerator, tracker_config
    from ldm.train_loop import make_optimizer

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(output_dir, args.gradient_accumulation_steps, args.mixed_precision,
                                   args.report_to, "logs", args.seed)
    model = PosteriorAutoencoder(build_vae(args).train())
    lpips = perceptual_loss_fn(args.perceptual_weight)
    if lpips is not None:
        lpips.to(accelerator.device).requires_grad_(False)
    data_args = DataArgs.from_args(args)
    with accelerator.main_process_first():
        dataset, collator, _ = prepare_training_dataset(data_args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                         collate_fn=collator, num_workers=args.dataloader_num_workers)
    params = list(model.parameters())
    optimizer = make_optimizer(params, args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_vae", config=tracker_config(args))

    loop = LoopConfig(output_dir, args.max_train_steps, args.checkpointing_steps, args.checkpoints_total_limit,
                      args.resume_from_checkpoint, args.max_grad_norm, args.gradient_accumulation_steps, args.seed,
                      desc="VAE steps",
                      images_per_step=accelerator.num_processes * args.train_batch_size
                      * args.gradient_accumulation_steps)
    run_training(accelerator, model, optimizer, lr_scheduler, loader, partial(vae_loss, args, model, lpips), loop)
    unwrapped = accelerator.unwrap_model(model).vae.eval()
    check_in_sync(accelerator, unwrapped)
    scaling = latent_scaling_factor(unwrapped, loader, args.scaling_samples, accelerator.device)
    if accelerator.is_main_process:
        unwrapped.register_to_config(scaling_factor=scaling)
        unwrapped.save_pretrained(output_dir)
        logger.info("Saved the VAE to %s (scaling_factor %.4f)", output_dir, scaling)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("train_vae", main, parse_args)
