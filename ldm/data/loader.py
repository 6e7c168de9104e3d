"""The training DataLoader: checked (and optionally cached) image-caption data, as accelerate expects it."""

from __future__ import annotations

import torch


def make_train_dataloader(accelerator, data_args, vae, text_encoder, tokenizer, batch_size: int,
                          cache_latents: bool = False, cache_dir: str | None = None, random_flip: bool = False,
                          num_workers: int = 0):
    """Checked (and optionally cached) training data as a DataLoader, plus the Counter of skipped rows."""
    from .image_caption import prepare_training_dataset
    from .latent_cache import cache_latents_and_text

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
