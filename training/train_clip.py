#!/usr/bin/env python
"""Train a small transformers ``CLIPModel`` (text + vision towers, contrastive loss) on image-caption pairs.

    accelerate launch training/train_clip.py --train_data_dir data/emoji --output_dir models/emoji-clip

The text tower becomes a pipeline's frozen ``text_encoder`` (saved on its own in ``<output_dir>/text_encoder``, with
the tokenizer in ``<output_dir>/tokenizer``); the whole CLIP (``<output_dir>``) scores generated images
(``ldm.eval.clip_metrics``). Each step draws one caption per image from its caption list and shifts the image by up
to ``--max_shift`` pixels (white padding). Renders of the same concept (a ``--concept_column`` value, e.g. the other
style or a skin tone) in one batch count as positives of each other, not negatives. Without ``--tokenizer`` a
CLIP-format BPE is trained on the training captions first. Exact resume, atomic checkpoints and the NaN stop are the
shared loop's (``ldm.train_loop``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ldm.data.image_caption import add_data_arguments
    from ldm.train_loop import add_loop_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p, 64)
    p.add_argument("--concept_column", default="hexcode", help="rows sharing this value are positives of each other")
    p.add_argument("--max_shift", type=int, default=4, help="random shift of each image in pixels (white padding)")
    g = p.add_argument_group("model")
    g.add_argument("--tokenizer", default=None, help="CLIP-format tokenizer folder (default: train one)")
    g.add_argument("--num_merges", type=int, default=8000, help="BPE merges of the trained tokenizer")
    g.add_argument("--text_width", type=int, default=256)
    g.add_argument("--text_layers", type=int, default=4)
    g.add_argument("--vision_width", type=int, default=256)
    g.add_argument("--vision_layers", type=int, default=4)
    g.add_argument("--patch_size", type=int, default=8)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--projection_dim", type=int, default=256)
    g = add_loop_arguments(p, "ldm-clip", batch=128, steps=4000, learning_rate=5e-4, warmup=200, checkpointing=500)
    g.add_argument("--weight_decay", type=float, default=0.1)
    args = p.parse_args(argv)
    from ldm.train_loop import check_counts

    check_counts(args)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give --dataset_name or --train_data_dir.")
    if args.resolution % args.patch_size:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of --patch_size {args.patch_size}.")
    return args


def build_tokenizer(args, dataset, caption_column: str):
    """The given tokenizer, or a CLIP-format BPE trained on every caption of the training data."""
    from ldm.tokenizer import load_tokenizer, train_clip_bpe, write_tokenizer_files

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    folder = Path(args.output_dir) / "tokenizer"
    if not (folder / "vocab.json").is_file():
        corpus = []
        for value in dataset[caption_column]:
            corpus += value if isinstance(value, list) else [value]
        vocab, merges = train_clip_bpe([c for c in corpus if isinstance(c, str)], args.num_merges)
        write_tokenizer_files(folder, vocab, merges)
    return load_tokenizer(folder)


def build_clip(args, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=args.text_width, intermediate_size=4 * args.text_width,
                         num_hidden_layers=args.text_layers, num_attention_heads=args.heads,
                         max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                           num_hidden_layers=args.vision_layers, num_attention_heads=args.heads,
                           image_size=args.resolution, patch_size=args.patch_size),
        projection_dim=args.projection_dim,
    )
    torch.manual_seed(args.seed)
    return CLIPModel(config)


@dataclass
class ClipLoss:
    loss: torch.Tensor
    accuracy: torch.Tensor  # image -> text top-1 within the batch

    def logs(self) -> dict[str, float]:
        return {"batch_accuracy": self.accuracy.item()}


def shift_images(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, 3, H, W) moved by up to ``max_shift`` pixels each way, the uncovered border white."""
    if max_shift <= 0:
        return pixels
    b, _, h, w = pixels.shape
    padded = F.pad(pixels, [max_shift] * 4, value=1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def clip_step(args, clip, tokenizer, batch: dict, generator: torch.Generator) -> ClipLoss:
    """Symmetric InfoNCE over the batch; same-concept pairs are positives (targets spread over them)."""
    lists = batch["caption_lists"]
    picks = torch.randint(0, 1 << 30, (len(lists),), generator=generator).tolist()
    captions = [options[k % len(options)] for options, k in zip(lists, picks)]
    pixels = shift_images(batch["pixel_values"], args.max_shift, generator)
    enc = tokenizer(captions, padding=True, truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt")
    device = next(clip.parameters()).device
    out = clip(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
               pixel_values=pixels.to(device))
    logits = out.logits_per_image.float()  # (B, B), scaled by the learned temperature
    concept = batch["concept"].to(device)
    positives = (concept[:, None] == concept[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
    accuracy = positives.gather(1, logits.argmax(1, keepdim=True)).mean()
    return ClipLoss(loss, accuracy.detach())


class ClipCollator:
    """The image-caption collator's batch plus every row's caption list and concept id."""

    def __init__(self, base, concept_column: str, concepts: dict):
        self.base, self.concept_column, self.concepts = base, concept_column, concepts

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.base(rows)
        batch["concept"] = torch.tensor([self.concepts[r.get(self.concept_column, i)] for i, r in enumerate(rows)])
        return batch


def prepare(args, accelerator):
    """Data (checked rows), tokenizer, CLIP, optimizer and schedule, prepared by accelerate."""
    from diffusers.optimization import get_scheduler

    from ldm.data.image_caption import DataArgs, prepare_training_dataset
    from ldm.train_loop import make_optimizer

    with accelerator.main_process_first():
        dataset, collator, _ = prepare_training_dataset(DataArgs.from_args(args))
        tokenizer = build_tokenizer(args, dataset, collator.caption_column)
    values = dataset[args.concept_column] if args.concept_column in dataset.column_names else range(len(dataset))
    concepts = {v: i for i, v in enumerate(sorted(set(values)))}
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=ClipCollator(collator, args.concept_column, concepts),
                                         num_workers=args.dataloader_num_workers)
    clip = build_clip(args, tokenizer)
    params = list(clip.parameters())
    optimizer = make_optimizer(params, args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    clip, optimizer, loader, lr_scheduler = accelerator.prepare(clip, optimizer, loader, lr_scheduler)
    return clip, tokenizer, optimizer, loader, lr_scheduler, params, len(concepts)


def save(args, clip, tokenizer) -> None:
    """The CLIP, its text tower as a ``CLIPTextModel`` (a pipeline's text_encoder) and the tokenizer."""
    from transformers import CLIPTextModel

    out = Path(args.output_dir)
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    text.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")


def main(args: argparse.Namespace) -> Path:
    from ldm.distributed import check_in_sync, make_accelerator, tracker_config
    from ldm.train_loop import LoopConfig, run_training

    accelerator = make_accelerator(args.output_dir, args.gradient_accumulation_steps, args.mixed_precision,
                                   args.report_to, "logs", args.seed)
    clip, tokenizer, optimizer, loader, lr_scheduler, params, n_concepts = prepare(args, accelerator)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_clip", config=tracker_config(args))
        (Path(args.output_dir) / "training_args.json").write_text(json.dumps(tracker_config(args, json_ready=True),
                                                                              indent=2))
    unwrapped = accelerator.unwrap_model(clip)
    logger.info("Training CLIP (%.1fM parameters) on %d concepts for %d steps (%.1f epochs)",
                sum(p.numel() for p in params) / 1e6, n_concepts, args.max_train_steps,
                args.max_train_steps / max(1, math.floor(len(loader) / args.gradient_accumulation_steps)))
    loop = LoopConfig(args.output_dir, args.max_train_steps, args.checkpointing_steps, args.checkpoints_total_limit,
                      args.resume_from_checkpoint, args.max_grad_norm, args.gradient_accumulation_steps, args.seed,
                      desc="CLIP steps",
                      images_per_step=accelerator.num_processes * args.train_batch_size
                      * args.gradient_accumulation_steps)
    run_training(accelerator, clip, optimizer, lr_scheduler, loader, partial(clip_step, args, clip, tokenizer),
                 loop)
    check_in_sync(accelerator, unwrapped)
    if accelerator.is_main_process:
        save(args, unwrapped.eval(), tokenizer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return Path(args.output_dir)


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("train_clip", main, parse_args)
