"""The optimisation loop shared by ``train_t2i.py`` and ``distill.py``.

Epochs over a prepared DataLoader with gradient accumulation, gradient clipping, EMA, a progress bar on the main
process, tracker logging, NaN/inf detection (stop before the bad update, keep every checkpoint), atomic checkpoints,
and exact resumption: the data order comes from the seedable sampler (``set_epoch``), already-seen batches are skipped
(not replayed), and every random draw of a step comes from ``step_generator(seed, micro_step, process)``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .data.image_caption import SKIP_REASONS
from .training_utils import all_finite, nan_error, step_generator

logger = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """What the loop needs to know besides the models: lengths, checkpoints, clipping, seed."""

    output_dir: str | Path
    max_train_steps: int
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    seed: int = 0
    desc: str = "Steps"
    log_prefix: str = ""  # tracker tags become f"{log_prefix}loss" ... (distill.py: one prefix per stage)
    skipped: Counter = field(default_factory=Counter)


def run_training(
    accelerator,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    loader,
    loss_fn: Callable[[dict, torch.Generator], object],
    params: list[torch.nn.Parameter],
    cfg: LoopConfig,
    ema=None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Train until ``cfg.max_train_steps`` optimizer steps; returns the final step.

    ``loss_fn(batch, generator)`` returns an object with a scalar ``loss`` and, optionally, ``logs()`` (a dict of
    floats to log). ``after_step(step)`` runs after each optimizer step (validation, ...), on every process.
    """
    from tqdm.auto import tqdm

    output_dir = Path(cfg.output_dir)
    step, epoch, batches_done = 0, 0, 0
    streamed = Counter()  # bad rows this process saw in streaming batches since the start or the resume
    resume_path = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        positions = state.get("positions", [])  # per process: streams split by file can end epochs apart
        if len(positions) == accelerator.num_processes:
            epoch, batches_done = positions[accelerator.process_index]
        if "skipped" in state:  # the saved counts already include those found up front (map-style data)
            cfg.skipped.clear()
            cfg.skipped.update(state["skipped"])
        logger.info("Resumed from %s at step %d (epoch %d, %d batches in)", resume_path, step, epoch, batches_done)

    def progress_state() -> dict:
        """Data position and bad-row counts over all processes (a collective call: every process makes it)."""
        local = torch.tensor([[epoch, batches_done, *(streamed[r] for r in SKIP_REASONS)]], device=accelerator.device)
        rows = accelerator.gather(local).tolist()
        skipped = Counter(cfg.skipped)
        for i, reason in enumerate(SKIP_REASONS):
            if total := sum(row[2 + i] for row in rows):
                skipped[reason] += total
        state = {"epoch": epoch, "batches_in_epoch": batches_done, "skipped": dict(skipped)}
        if accelerator.num_processes > 1:
            state["positions"] = [row[:2] for row in rows]
        return state

    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(total=cfg.max_train_steps, initial=step, desc=cfg.desc,
                    disable=not accelerator.is_local_main_process)
    micro_in_step = 0
    while step < cfg.max_train_steps:
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        fresh_epoch = batches_done == 0
        for batch in epoch_loader:
            generator = step_generator(cfg.seed, step * cfg.gradient_accumulation_steps + micro_in_step,
                                       accelerator.process_index)
            with accelerator.accumulate(model):
                out = loss_fn(batch, generator)
                if not all_finite(accelerator, out.loss):
                    progress.close()
                    accelerator.end_training()
                    raise nan_error(output_dir, step, out.loss)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            if epoch == 0:  # streaming data reports its bad rows again on every pass: count the first one
                for reason in SKIP_REASONS:
                    if f"skipped_{reason}" in batch:
                        streamed[reason] += int(batch[f"skipped_{reason}"].sum())
            if not accelerator.sync_gradients:
                micro_in_step += 1
                continue
            micro_in_step = 0
            if ema is not None:
                ema.step(unwrapped.parameters())
            step += 1
            logs = {"loss": out.loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
            logs.update(out.logs() if hasattr(out, "logs") else {})
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log({cfg.log_prefix + k: v for k, v in logs.items()}, step=step)
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                save_checkpoint(accelerator, output_dir, step, progress_state(), cfg.checkpoints_total_limit)
            if after_step is not None:
                after_step(step)
            if step >= cfg.max_train_steps:
                break
        else:
            if fresh_epoch and batches_done == 0:
                progress.close()
                raise ValueError("The training data gave no batch in a whole pass: it has fewer usable rows than one "
                                 "batch per process. Use more data or a smaller --train_batch_size.")
            epoch, batches_done = epoch + 1, 0
    progress.close()
    cfg.skipped = Counter(progress_state()["skipped"])
    return step
