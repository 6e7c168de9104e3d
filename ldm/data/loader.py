"""The training DataLoader: checked (and optionally cached) image-caption data, as accelerate expects it.

Rows are shuffled (accelerate's seedable sampler), or with ``--balance_by COLUMN`` drawn so that every value of that
column comes up equally often (:class:`BalancedSampler`): e.g. ``hexcode`` in the emoji data, where a person emoji has
12 skin-tone renders and a fox has 2.
"""

from __future__ import annotations

from collections import Counter

import torch


class BalancedSampler(torch.utils.data.Sampler):
    """``len(values)`` row indices per epoch, drawn with replacement, row i with probability proportional to
    1 / (rows sharing ``values[i]``): every value comes up equally often, a row of a value with n rows 1/n as often.

    Each epoch's draw is seeded by (seed, epoch) alone, so every process of a distributed run makes the same draw
    (accelerate hands each its share of the batches) and a resumed run repeats it: accelerate's ``set_epoch`` reaches
    this sampler, and ``skip_first_batches`` skips the batches already trained on.
    """

    def __init__(self, values, seed: int = 0):
        keys = [v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for v in values]
        counts = Counter(keys)
        self.weights = torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.float64)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        from ..train_loop import seeded_generator

        generator = seeded_generator(self.seed, self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


def balanced_sampler(dataset, data_args) -> BalancedSampler | None:
    """The :class:`BalancedSampler` of ``data_args.balance_by`` (None without it), checked against the data."""
    column = data_args.balance_by
    if column is None:
        return None
    if data_args.streaming:
        raise ValueError(f"--balance_by {column} needs a map-style data set: a stream cannot be drawn from by row. "
                         "Drop --streaming, or --balance_by.")
    if column not in dataset.column_names:
        raise ValueError(f"--balance_by {column}: the training data has no column {column!r}; its columns are "
                         f"{sorted(dataset.column_names)}.")
    return BalancedSampler(dataset[column], data_args.seed)


def make_train_dataloader(accelerator, data_args, vae, text_encoder, tokenizer, batch_size: int,
                          cache_latents: bool = False, cache_dir: str | None = None, random_flip: bool = False,
                          num_workers: int = 0):
    """Checked (and optionally cached) training data as a DataLoader, plus the Counter of skipped rows."""
    from .image_caption import prepare_training_dataset
    from .latent_cache import cache_latents_and_text

    with accelerator.main_process_first():
        dataset, collator, skipped = prepare_training_dataset(data_args)
        sampler = balanced_sampler(dataset, data_args)  # before the cache, which keeps the rows' order only
        if cache_latents:
            dataset = cache_latents_and_text(dataset, collator, vae, text_encoder, tokenizer, cache_dir, random_flip)
    # several processes on a stream with fewer files than processes: each reads the whole stream and keeps its own
    # batches of every round; drop_last stops accelerate from padding the ragged last round with repeated rows
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=not data_args.streaming and sampler is None, sampler=sampler,
        collate_fn=None if cache_latents else collator, num_workers=num_workers,
        drop_last=data_args.streaming and accelerator.num_processes > 1,
    )
    return loader, skipped
