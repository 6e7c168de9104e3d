"""The accelerate side of a training run: the ``Accelerator`` set-up, mixed-precision dtypes, trackers' config and
the checks made across processes (weights in sync, a finite loss everywhere)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def multi_process_without_accelerator() -> bool:
    """True for ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs: accelerate then needs
    ``cpu=True`` to form a gloo process group (otherwise every process would train alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Without it (an AVX2-only CPU) oneDNN
    emulates bf16 and autocast runs about 12x slower than float32 (a U-Net training step here: 31 s against 2.6 s)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(choice: str | None) -> str | None:
    """``"auto"`` -> ``"bf16"`` on a GPU or a CPU with native bf16, else ``"no"``; any other value unchanged."""
    if choice != "auto":
        return choice
    return "bf16" if has_accelerator() or cpu_has_native_bf16() else "no"


def warn_if_emulated_bf16(mixed_precision: str | None, device: torch.device) -> bool:
    """Warn (and return True) when bf16 autocast would run on a CPU that emulates it: slower than float32."""
    if mixed_precision != "bf16" or torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return False
    logger.warning("--mixed_precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX; torch reports %s): "
                   "bf16 is emulated here and trains about 10x slower than float32. Use --mixed_precision no.",
                   torch.backends.cpu.get_cpu_capability())
    return True


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
    check_trackers(report_to)
    check_unsharded()
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
    if accelerator.is_local_main_process:
        warn_if_emulated_bf16(accelerator.mixed_precision, accelerator.device)
    if accelerator.is_main_process:
        from .checkpointing import lock_output_dir, remove_incomplete

        lock_output_dir(output_dir)  # one run per output folder
        remove_incomplete(output_dir)
    accelerator.wait_for_everyone()
    return accelerator


def sharded_setup(env=None) -> str | None:
    """The sharded set-up ``accelerate launch`` asks for through the environment (FSDP, DeepSpeed ZeRO-3,
    Megatron), or None: DDP, ZeRO-1/2 or one process."""
    import os

    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        return "FSDP"
    if env.get("ACCELERATE_USE_MEGATRON_LM", "").lower() in ("1", "true", "yes"):
        return "Megatron-LM"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes") and \
            env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def check_unsharded(env=None) -> None:
    """Refuse parameter sharding with a clear message: the EMA, the cross-process weight check, validation and the
    final save read the full weights of the unwrapped model, which sharding splits across processes. None of it has
    run sharded (accelerate's FSDP does not run on CPU), so it is refused rather than silently wrong."""
    setup = sharded_setup(env)
    if setup is not None:
        raise ValueError(
            f"{setup} shards the model's parameters across processes; ldm's training scripts read full weights "
            "(EMA, the sync check, validation, the final save) and have only run with DDP. Use data parallelism "
            "(`accelerate config`: multi-GPU without FSDP, or DeepSpeed ZeRO stage 1 or 2), which keeps whole "
            "weights on every process.")


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_trackers(report_to: str) -> None:
    """Fail before training when a ``--report_to`` tracker is not installed (accelerate would only warn and then
    track nothing)."""
    import importlib.util

    for name in [n.strip() for n in report_to.split(",")] if report_to not in ("none", "all") else []:
        package = TRACKER_PACKAGES.get(name)
        if package is None:
            raise ValueError(f"--report_to {name!r} is not a tracker accelerate knows; use one of "
                             f"{sorted(TRACKER_PACKAGES)}, 'all' or 'none'.")
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"--report_to {name} needs the {package} package: pip install {package}, or pass "
                              "--report_to tensorboard (the default) or none.")


def tracker_config(args, json_ready: bool = False) -> dict:
    """A script's arguments for the trackers (scalars as they are, anything else as a string, unset ones as "")
    or, with ``json_ready``, for ``training_args.json`` (unset ones as null, lists as lists); never the Hub token."""
    out = {}
    for key, value in vars(args).items():
        if key == "hub_token":
            continue
        if json_ready:
            out[key] = value if value is None or isinstance(value, (int, float, str, bool, list)) else str(value)
        else:
            out[key] = "" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype for frozen models under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def vae_dtype_of(accelerator, choice: str = "fp32") -> torch.dtype:
    """The frozen VAE's dtype: float32 (``"fp32"``, the default: encoding is cheap and half precision blurs fine
    detail) or the mixed-precision dtype (``"weight"``)."""
    if choice not in ("fp32", "weight"):
        raise ValueError(f"--vae_dtype must be 'fp32' or 'weight' (the mixed-precision dtype), got {choice!r}")
    return torch.float32 if choice == "fp32" else weight_dtype_of(accelerator)


def check_in_sync(accelerator, model) -> None:
    """Fail loudly if the processes hold different weights (a broken data-parallel set-up)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = accelerator.gather(checksum[None].to(accelerator.device))
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"The processes ended with different weights (checksums {gathered.tolist()}).")
    logger.info("Weights identical on all %d processes (checksum %.10g)", accelerator.num_processes,
                float(gathered[0]))
