"""Atomic, rotating training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is written to ``<output_dir>/.tmp-checkpoint-<step>`` by every process, completed with a
``training_state.json`` (written last, fsynced), and only then renamed to ``checkpoint-<step>``: a run killed at any
moment (even SIGKILL mid-save) leaves either the previous complete checkpoints or the new one, never a half-written
``checkpoint-*``. Old checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
#: Called as ``hook(step, tmp_folder)`` on the main process once a checkpoint's files are written, just before it is
#: published (renamed to ``checkpoint-<step>``). Empty in normal runs; the tests append a hook that kills the process
#: there to prove that a save interrupted at its worst moment loses nothing.
BEFORE_PUBLISH_HOOKS: list[Callable[[int, Path], None]] = []


def _step_of(path: Path) -> int:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) >= 0 and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file in a checkpoint folder but the state file."""
    return {str(f.relative_to(folder)): [f.stat().st_size, _sha256(f)] for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != STATE_FILE}


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed (unreadable state, a file missing, truncated or changed
    since it was written), or None when it checks out. Checkpoints older than the manifest get the state check."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        missing = [k for k in ("step", "epoch", "batches_in_epoch") if k not in state]
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    if missing:
        return f"{STATE_FILE} lacks {missing}"
    for name, (size, sha) in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was written (truncated?)"
        if _sha256(file) != sha:
            return f"{name} changed since it was written (its sha256 differs)"
    return None


def latest_good_checkpoint(output_dir, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint that passes :func:`checkpoint_problem` (skipping ``exclude``), warning about each bad
    one it passes over."""
    for path in reversed(list_checkpoints(output_dir)):
        if exclude is not None and path == exclude:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping %s: %s.", path, problem)
    return None


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


EMA_FILE = "ema.safetensors"


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict,
                    total_limit: int | None = None, ema=None) -> Path:
    """Save the accelerator state (models, optimizers, schedulers, RNG) plus ``state``, and diffusers' ``EMAModel``
    as ``ema.safetensors`` with its scalars in ``training_state.json`` (never a pickle).

    Must be called on every process. Returns the final ``checkpoint-<step>`` path.
    """
    root = Path(output_dir)
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _complete(tmp, state, step, ema)
    except (OSError, RuntimeError) as err:  # a full disk shows as "enforce fail at inline_container.cc"
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_good_checkpoint(root)
        free = shutil.disk_usage(root).free / 2 ** 30
        raise RuntimeError(
            f"Writing checkpoint-{step} to {root} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"{free:.2f} GiB are free there (a full disk?). "
            + (f"The previous checkpoint {previous} is intact: " if previous else "No checkpoint was saved yet: ")
            + "free some space and rerun with --resume_from_checkpoint latest.") from err
    if accelerator.is_main_process:
        _publish(root, tmp, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def _complete(tmp: Path, state: dict, step: int, ema) -> None:
    """The EMA, the file manifest and (last, fsynced) the state file: the checkpoint is complete once it exists."""
    if ema is not None:
        state = dict(state, ema=save_ema(ema, tmp / EMA_FILE))
    state = dict(state, files=manifest(tmp))  # size + sha256 of every file: `latest` checks them
    for hook in BEFORE_PUBLISH_HOOKS:
        hook(step, tmp)
    _fsync_write(tmp / STATE_FILE, json.dumps(dict(state, step=step), indent=2))


def _publish(root: Path, tmp: Path, final: Path, total_limit: int | None) -> None:
    """Rename the complete temporary folder into place (atomically), then prune old checkpoints."""
    if final.exists():  # re-saving a step (e.g. after resuming): keep the old one until the new one is in place
        old = root / f"{TMP_PREFIX}{final.name.removeprefix(PREFIX)}-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if total_limit is not None:
        for old in list_checkpoints(root)[:-total_limit]:
            logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
            shutil.rmtree(old, ignore_errors=True)


_LOCKS: dict[str, object] = {}  # output folder -> the open lock file this process holds


def lock_output_dir(output_dir: str | os.PathLike) -> None:
    """Take an exclusive lock on ``output_dir`` for this process's lifetime (released when it exits, even killed):
    a second run writing to the same folder would interleave or replace the first one's checkpoints."""
    import fcntl

    root = Path(output_dir).resolve()
    if str(root) in _LOCKS:
        return
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RuntimeError(f"Another run ({holder}) is writing to {root}; wait for it to finish or use another "
                           "--output_dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _LOCKS[str(root)] = handle


def remove_incomplete(output_dir: str | os.PathLike) -> None:
    """Delete leftovers of interrupted saves (main process only)."""
    root = Path(output_dir)
    if root.is_dir():
        for leftover in root.glob(f"{TMP_PREFIX}*"):
            logger.warning("Removing %s, left by a save that did not finish.", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(output_dir: str | os.PathLike, resume_from: str | None, quiet: bool = False) -> Path | None:
    """``"latest"`` -> newest complete checkpoint in ``output_dir`` (None when there is none: a new run, said in the
    log unless ``quiet``); a path -> that path, checked to be a complete checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        if not list_checkpoints(output_dir):
            (logger.info if quiet else logger.warning)(
                "--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run.", output_dir)
            return None
        good = latest_good_checkpoint(output_dir)
        if good is None:
            raise ValueError(f"No checkpoint in {output_dir} passes its integrity check (see the warnings); "
                             "delete them to start a new run there.")
        return good
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from}: {path} is not a complete checkpoint (no {STATE_FILE}). "
            f"Complete ones: {[p.name for p in list_checkpoints(output_dir)] or 'none'}."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        good = latest_good_checkpoint(output_dir, exclude=path)
        raise ValueError(f"--resume_from_checkpoint {resume_from}: {path} is damaged: {problem}. "
                         + (f"The newest good one is {good}." if good else "No other checkpoint is good."))
    return path


def save_ema(ema, path: Path) -> dict:
    """Write the EMA's shadow weights to ``path`` (safetensors); returns its scalars (decay, step, ...)."""
    from safetensors.torch import save_file

    scalars = ema.state_dict()
    shadow = scalars.pop("shadow_params")
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(path))
    return {k: v for k, v in scalars.items() if isinstance(v, (int, float, bool, type(None)))}


def load_ema(ema, path: Path, scalars: dict, checkpoint: Path) -> None:
    """Restore an ``EMAModel`` saved by :func:`save_ema`; a file that does not match this model is an error."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    shadow = ema.shadow_params
    if len(tensors) != len(shadow) or any(tuple(tensors[str(i)].shape) != tuple(p.shape) for i, p in enumerate(shadow)):
        raise ValueError(f"{path} holds EMA weights of another model ({len(tensors)} tensors for {len(shadow)} "
                         f"parameters); checkpoint {checkpoint} cannot resume this run.")
    state = dict(scalars, shadow_params=[tensors[str(i)].to(p.device, p.dtype) for i, p in enumerate(shadow)])
    ema.load_state_dict(state)


def load_checkpoint(accelerator, path: str | os.PathLike, ema=None) -> dict:
    """Restore the accelerator state saved by ``save_checkpoint`` (and the EMA when there is one); returns the saved
    ``state`` dict. Nothing in the folder is unpickled except through torch's weights-only loader."""
    path = Path(path)
    if (path / "custom_checkpoint_0.pkl").exists():
        raise ValueError(f"{path} was written by an older ldm that pickled the EMA (custom_checkpoint_0.pkl); "
                         "ldm no longer unpickles it. Delete that file to resume with a fresh EMA, or start a new "
                         "run.")
    state = json.loads((path / STATE_FILE).read_text())
    has_ema = (path / EMA_FILE).is_file()
    if ema is None and has_ema:
        raise ValueError(f"Checkpoint {path} holds EMA weights (it was trained with --use_ema): pass --use_ema to "
                         "resume it.")
    if ema is not None and not has_ema:
        raise ValueError(f"Checkpoint {path} has no EMA weights (it was trained without --use_ema): drop "
                         "--use_ema to resume it, or start a new run.")
    schedulers = [s.scheduler for s in accelerator._schedulers if hasattr(s.scheduler, "base_lrs")]
    asked = [list(s.base_lrs) for s in schedulers]  # this run's --learning_rate, before load_state replaces it
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        good = latest_good_checkpoint(path.parent, exclude=path)
        raise ValueError(f"Cannot resume from {path}: {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
                         + (f"The newest other good checkpoint is {good}: resume from it with "
                            f"--resume_from_checkpoint {good}." if good else "There is no other good checkpoint.")
                         ) from err
    keep_learning_rates(schedulers, asked, path)
    if ema is not None:
        load_ema(ema, path / EMA_FILE, state.get("ema", {}), path)
    return state


def keep_learning_rates(schedulers: list, asked: list[list[float]], path: Path) -> None:
    """Put back the peak learning rates ``asked`` this run was started with (``--learning_rate``) after ``load_state``
    restored into ``schedulers`` those of the run that wrote ``path``: the schedule goes on from the saved step at the
    asked rate, with a warning naming both, and the next update already uses it."""
    for scheduler, lrs in zip(schedulers, asked):
        if scheduler.base_lrs == lrs:
            continue
        logger.warning("Checkpoint %s was trained at learning rate %s; this run goes on at --learning_rate %s (the "
                       "schedule continues from the saved step).", path, scheduler.base_lrs[0], lrs[0])
        for group, old, new in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lrs):
            group["lr"] = group["lr"] * new / old if old else new
        scheduler.base_lrs = list(lrs)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
