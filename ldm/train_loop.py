"""The optimisation loop shared by ``train_t2i.py`` and ``distill.py``.

Epochs over a prepared DataLoader with gradient accumulation, gradient clipping, EMA, a progress bar on the main
process, tracker logging, NaN/inf detection (stop before the bad update, keep every checkpoint), atomic checkpoints,
and exact resumption: the data order comes from the seedable sampler (``set_epoch``), already-seen batches are skipped
(not replayed), and every random draw of a step comes from ``step_generator(seed, micro_step, process)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .data.image_caption import SKIP_REASONS

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
    always_resumes: bool = False  # "latest" is the script's default (distill.py), so a fresh start is no news
    images_per_step: int = 0  # batch x accumulation x processes: logs images/s when set
    history: list = field(default_factory=list)  # every step's logs, in order (as the trackers get them)
    skipped: Counter = field(default_factory=Counter)


@dataclass
class LoopState:
    """Where a run is: optimizer steps done, the data position, and bad rows seen in streamed batches."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    micro_in_step: int = 0
    streamed: Counter = field(default_factory=Counter)  # this process's, since the start or the resume
    loss_sum: object = 0.0  # this step's micro-batch losses so far (a device tensor: no host sync)
    micro_batches: int = 0
    logs: dict = field(default_factory=dict)
    step_started: float | None = None


COUNTS = ("checkpointing_steps", "gradient_accumulation_steps", "max_train_steps", "train_batch_size",
          "num_train_epochs", "validation_steps", "steps_per_round", "guidance_steps", "checkpoints_total_limit")


def add_loop_arguments(parser, output_dir: str, batch: int, steps: int, learning_rate: float, warmup: int,
                       checkpointing: int):
    """The optimisation and output flags of the scripts built on :func:`run_training` (``train_vae.py``,
    ``train_clip.py``), with each script's defaults; returns the optimisation group for its own extras."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=batch)
    g.add_argument("--max_train_steps", type=int, default=steps)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=learning_rate)
    g.add_argument("--lr_warmup_steps", type=int, default=warmup)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default=output_dir)
    out.add_argument("--checkpointing_steps", type=int, default=checkpointing)
    out.add_argument("--checkpoints_total_limit", type=int, default=2)
    out.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    out.add_argument("--report_to", default="tensorboard")
    return g


def check_counts(args) -> None:
    """Step and batch counts a script was given are whole numbers >= 1 (0 would divide by zero or save an untrained
    model): a ``ValueError`` naming the flag."""
    for name in COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")


def seeded_generator(*keys: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded by the integer ``keys`` alone (stable across Python versions)."""
    import numpy as np

    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def step_generator(seed: int, micro_step: int, process_index: int, device="cpu") -> torch.Generator:
    """The generator of one micro-step on one process, on ``device`` (the accelerator's: the noise is drawn where it
    is used): every random draw of a step comes from it, so a resumed run repeats exactly the draws an
    uninterrupted one makes (on the same kind of device)."""
    return seeded_generator(seed, micro_step, process_index, device=device)


def nan_error(output_dir: str | Path, step: int, loss: float) -> RuntimeError:
    """The error a run stops with when its loss stops being finite (nothing is saved after it)."""
    from .checkpointing import list_checkpoints

    found = list_checkpoints(output_dir)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
    return RuntimeError(
        f"The loss became {loss} (non-finite) at step {step + 1}; training stopped without saving, {last}. "
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


def resume(accelerator, cfg: LoopConfig, ema=None) -> LoopState:
    """The state to start from: fresh, or restored from ``cfg.resume_from_checkpoint`` (``"latest"`` or a path)."""
    state = LoopState()
    path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, quiet=cfg.always_resumes)
    if path is None:
        return state
    saved = load_checkpoint(accelerator, path, ema)
    state.step, state.epoch, state.batches_done = saved["step"], saved["epoch"], saved["batches_in_epoch"]
    positions = saved.get("positions", [])  # per process: streams split by file can end epochs apart
    if len(positions) == accelerator.num_processes:
        state.epoch, state.batches_done = positions[accelerator.process_index]
    if "skipped" in saved:  # the saved counts already include those found up front (map-style data)
        cfg.skipped.clear()
        cfg.skipped.update(saved["skipped"])
    logger.info("Resumed from %s at step %d (epoch %d, %d batches in)", path, state.step, state.epoch,
                state.batches_done)
    return state


def progress_state(accelerator, cfg: LoopConfig, state: LoopState) -> dict:
    """Data position and bad-row counts over all processes, as a checkpoint stores them (a collective call)."""
    local = torch.tensor([[state.epoch, state.batches_done, *(state.streamed[r] for r in SKIP_REASONS)]],
                         device=accelerator.device)
    rows = accelerator.gather(local).tolist()
    skipped = Counter(cfg.skipped)
    for i, reason in enumerate(SKIP_REASONS):
        if total := sum(row[2 + i] for row in rows):
            skipped[reason] += total
    saved = {"epoch": state.epoch, "batches_in_epoch": state.batches_done, "skipped": dict(skipped)}
    if accelerator.num_processes > 1:
        saved["positions"] = [row[:2] for row in rows]
    return saved


def micro_step(accelerator, model, optimizer, lr_scheduler, loss_fn, batch, generator, cfg: LoopConfig,
               state: LoopState, progress):
    """Forward and backward of one micro-batch; when gradients sync, clipping, the step's one host sync (the loss
    summed over micro-batches and processes, and the grad norm, checked finite before the update) and the update."""
    with accelerator.accumulate(model):
        out = loss_fn(batch, generator)
        accelerator.backward(out.loss)
        state.loss_sum = out.loss.detach().float() + state.loss_sum
        state.micro_batches += 1
        if accelerator.sync_gradients:
            # the prepared model's own parameters (a wrapper may replace the tensors the script built)
            norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               cfg.max_grad_norm or float("inf"))
            norm = torch.as_tensor(norm if norm is not None else float("nan"), device=accelerator.device).float()
            rows = accelerator.gather(torch.stack([state.loss_sum, norm])[None]).tolist()  # (processes, 2)
            loss = sum(r[0] for r in rows) / (len(rows) * state.micro_batches)
            if not math.isfinite(loss):
                progress.close()
                accelerator.end_training()
                raise nan_error(cfg.output_dir, state.step, loss)
            state.logs = {"loss": loss, "grad_norm": rows[0][1]}
            state.loss_sum, state.micro_batches = 0.0, 0
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def end_of_step(accelerator, lr_scheduler, out, cfg: LoopConfig, state: LoopState, progress, ema, unwrapped) -> None:
    """After an optimizer step: EMA, logs (loss averaged over accumulation and processes, grad norm, images/s),
    progress bar, and the checkpoint when one is due."""
    if ema is not None:
        ema.step(unwrapped.parameters())
    state.step += 1
    now = time.perf_counter()
    logs = dict(state.logs, lr=lr_scheduler.get_last_lr()[0])
    if cfg.images_per_step and state.step_started is not None:
        logs["images_per_s"] = cfg.images_per_step / max(now - state.step_started, 1e-9)
    state.step_started = now
    logs.update(out.logs() if hasattr(out, "logs") else {})
    cfg.history.append(logs)
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.4f}")
    accelerator.log({cfg.log_prefix + k: v for k, v in logs.items()}, step=state.step)
    if state.step % cfg.checkpointing_steps == 0 or state.step == cfg.max_train_steps:
        save_checkpoint(accelerator, cfg.output_dir, state.step, progress_state(accelerator, cfg, state),
                        cfg.checkpoints_total_limit, ema=ema)


def count_streamed_skips(batch: dict, state: LoopState) -> None:
    """Streaming data reports its bad rows in the batches, again on every pass: count the first pass."""
    if state.epoch == 0:
        for reason in SKIP_REASONS:
            if f"skipped_{reason}" in batch:
                state.streamed[reason] += int(batch[f"skipped_{reason}"].sum())


def run_training(
    accelerator,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    loader,
    loss_fn: Callable[[dict, torch.Generator], object],
    cfg: LoopConfig,
    ema=None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Train until ``cfg.max_train_steps`` optimizer steps; returns the final step.

    ``loss_fn(batch, generator)`` returns an object with a scalar ``loss`` and, optionally, ``logs()`` (a dict of
    floats to log). ``after_step(step)`` runs after each optimizer step (validation, ...), on every process.
    """
    from tqdm.auto import tqdm

    state = resume(accelerator, cfg, ema)
    state.step_started = time.perf_counter()
    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(total=cfg.max_train_steps, initial=state.step, desc=cfg.desc,
                    disable=not accelerator.is_local_main_process)
    while state.step < cfg.max_train_steps:
        loader.set_epoch(state.epoch)
        fresh_epoch = state.batches_done == 0
        epoch_loader = loader if fresh_epoch else accelerator.skip_first_batches(loader, state.batches_done)
        for batch in epoch_loader:
            generator = step_generator(cfg.seed, state.step * cfg.gradient_accumulation_steps + state.micro_in_step,
                                       accelerator.process_index, accelerator.device)
            out = micro_step(accelerator, model, optimizer, lr_scheduler, loss_fn, batch, generator, cfg,
                             state, progress)
            state.batches_done += 1
            count_streamed_skips(batch, state)
            if not accelerator.sync_gradients:
                state.micro_in_step += 1
                continue
            state.micro_in_step = 0
            end_of_step(accelerator, lr_scheduler, out, cfg, state, progress, ema, unwrapped)
            if after_step is not None:
                after_step(state.step)
            if state.step >= cfg.max_train_steps:
                break
        else:
            if fresh_epoch and state.batches_done == 0:
                progress.close()
                raise ValueError("The training data gave no batch in a whole pass: it has fewer usable rows than one "
                                 "batch per process. Use more data or a smaller --train_batch_size.")
            state.epoch, state.batches_done = state.epoch + 1, 0
    progress.close()
    cfg.skipped = Counter(progress_state(accelerator, cfg, state)["skipped"])
    return state.step
