"""Checks of a saved pipeline folder before and after ``LatentPipeline.from_pretrained`` loads it.

diffusers and transformers meet a damaged or edited folder with unrelated tracebacks (or load it silently wrong);
each check here turns one such case into an ``OSError`` that names the file, the problem and the fix:

- ``check_local_folder``: a path meant as a local folder that is not one (with the closest names);
- ``check_model_index``: a ``model_index.json`` that is not an object of ``[library, class]`` pairs;
- ``check_config_sizes``: a ``config.json`` whose sizes do not match its weights file (checked on the meta device,
  before anything is allocated: an edited ``block_out_channels`` would otherwise try to allocate terabytes);
- ``pickle_only_weights`` / ``find_unreadable_weights``: pickled or truncated weights files;
- ``check_complete``: a weights file that lacks some of its model's tensors.
"""

from __future__ import annotations

import importlib
import json
import os

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import safe_open

LIBRARIES = ("ldm", "diffusers", "transformers")  # the only modules a model_index entry may resolve to here


def check_local_folder(path: str) -> None:
    """An ``OSError`` for a path meant as a local folder that is not one (a Hub id is ``user/name``, nothing else).

    Local: absolute, ``./``-relative, existing, more than one ``/``, or a first part that is a local folder (the
    typo ``models/shapes-teachr`` next to ``models/``); the error names the closest existing folders."""
    import difflib

    if os.path.isdir(path):
        return
    parts = path.replace(os.sep, "/").split("/")
    local = (os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or len(parts) > 2
             or (len(parts) == 2 and os.path.isdir(parts[0])))
    if not local:
        return
    problem = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    parent = os.path.dirname(path) or "."
    siblings = sorted(n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n))) \
        if os.path.isdir(parent) else []
    close = difflib.get_close_matches(os.path.basename(path), siblings, n=3)
    hint = f" Did you mean {', '.join(os.path.join(parent, c) for c in close)}?" if close else ""
    raise OSError(f"The pipeline folder {path} {problem}.{hint} Pass a folder written by "
                  "LatentPipeline.save_pretrained or a Hub id such as 'user/model'.")


def safetensors_files(folder: str, variant: str | None) -> list[str]:
    """The ``*.safetensors`` files of one component folder that ``from_pretrained`` reads for ``variant``."""
    return [f for f in weight_files(folder) if f.endswith(".safetensors") and
            (os.path.basename(f).endswith(f".{variant}.safetensors") if variant
             else os.path.basename(f).count(".") == 1)]


def saved_shapes(files: list[str], module=None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of safetensors files, read from their headers (nothing is loaded); keys pass through
    the module's ``_fix_state_dict_keys_on_load`` (old layouts renamed) when it has one."""
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    if module is not None and hasattr(module, "_fix_state_dict_keys_on_load"):
        fixed = dict(shapes)
        module._fix_state_dict_keys_on_load(fixed)
        shapes = fixed
    return shapes


def check_complete(pipe, path: str, variant: str | None) -> None:
    """Every parameter of every model component came from its weights file (a file missing a tensor would leave
    the parameter on the meta device, or randomly initialised in transformers): else an ``OSError`` naming both."""
    if not os.path.isdir(path):
        return
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        files = safetensors_files(os.path.join(path, name), variant)
        if not files:
            continue
        saved = saved_shapes(files, module)
        missing = sorted(n for n, p in module.named_parameters() if n not in saved or p.is_meta)
        if missing:
            raise OSError(f"{', '.join(files)} lacks {len(missing)} of the {name}'s tensors ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}): the file is incomplete; re-save or re-download it.")


def _meta_model(library: str, class_name: str, folder: str) -> torch.nn.Module | None:
    """The component's model built from its ``config.json`` on the meta device (no memory), or ``None`` when the
    entry is not a model class of ``LIBRARIES``."""
    if library.split(".")[0] not in LIBRARIES:
        return None
    cls = getattr(importlib.import_module(library), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None
    with torch.device("meta"):
        if hasattr(cls, "config_class") and hasattr(cls.config_class, "from_pretrained"):  # transformers
            return cls(cls.config_class.from_pretrained(folder))
        return cls.from_config(cls.load_config(folder))


def check_layer_counts(config_file: str, num_tensors: int) -> None:
    """A layer count in ``config.json`` (a key naming ``layers`` or ``depth``) larger than the number of tensors in
    its weights file cannot be right (each layer holds at least one), and building it would take minutes: an
    ``OSError`` before anything is built."""
    if not os.path.isfile(config_file):
        return
    for key, value in json.loads(open(config_file).read()).items():
        counts = value if isinstance(value, list) else [value]
        if ("layers" in key or key == "depth") and any(isinstance(v, int) and v > num_tensors for v in counts):
            raise OSError(f"{config_file} gives {key}={value}, more layers than its weights file has tensors "
                          f"({num_tensors}): the config was edited or belongs to another model; restore the "
                          "config.json saved with these weights.")


def check_config_sizes(path: str, variant: str | None = None) -> None:
    """Each model component's ``config.json`` describes tensors of the shapes its weights file holds: else an
    ``OSError`` naming the config, the first mismatched tensor and both shapes. The model is built on the meta
    device, so an edited or absurd size (a width of 100000) is caught before anything is allocated."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        return
    for name, entry in json.loads(open(index_file).read()).items():
        folder = os.path.join(path, name)
        files = safetensors_files(folder, variant)
        if name.startswith("_") or not isinstance(entry, list) or None in entry or not files:
            continue
        config = os.path.join(folder, "config.json")
        try:
            num_tensors = len(saved_shapes(files))
        except Exception:  # noqa: BLE001  (a damaged file: from_pretrained's error names it)
            continue
        check_layer_counts(config, num_tensors)
        try:
            model = _meta_model(entry[0], entry[1], folder)
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            raise OSError(f"{config} does not describe a valid {entry[1]}: {err}") from err
        if model is None:
            continue
        saved = saved_shapes(files, model)
        for key, tensor in model.state_dict().items():
            if key in saved and tuple(tensor.shape) != saved[key]:
                raise OSError(f"{config} does not match {files[0]}: it describes {key} of shape "
                              f"{tuple(tensor.shape)}, the weights hold {saved[key]}. The config was edited or "
                              "belongs to another model; restore the config.json saved with these weights.")


def check_model_index(path: str) -> None:
    """A local ``model_index.json`` must be an object of ``[library, class]`` pairs, with a scheduler that is a
    scheduler class: else an ``OSError`` saying what is wrong (diffusers fails with an unrelated traceback)."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        return
    try:
        index = json.loads(open(index_file).read())
    except ValueError as err:
        raise OSError(f"{index_file} is not valid JSON ({err}).") from err
    if not isinstance(index, dict):
        raise OSError(f"{index_file} holds a {type(index).__name__}, not an object of components.")
    for name, entry in index.items():
        if name.startswith("_") or entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise OSError(f"{index_file}: component {name!r} is {entry!r}; each must be [library, class name].")
    scheduler = index.get("scheduler")
    if isinstance(scheduler, list) and scheduler[0] == "diffusers":
        import diffusers

        cls = getattr(diffusers, scheduler[1], None)
        if cls is not None and not issubclass(cls, SchedulerMixin):
            raise OSError(f"{index_file}: the scheduler entry names {scheduler[1]}, which is not a scheduler.")


def weight_files(path) -> list[str]:
    if not os.path.isdir(str(path)):
        return []
    return [os.path.join(root, name) for root, _, files in sorted(os.walk(str(path))) for name in sorted(files)
            if name.endswith((".safetensors", ".bin"))]


def pickle_only_weights(path) -> set[str]:
    """The component folders of a local pipeline that hold ``.bin`` weights and no ``.safetensors``."""
    files = weight_files(path)
    with_bin = {os.path.basename(os.path.dirname(f)) for f in files if f.endswith(".bin")}
    with_safetensors = {os.path.basename(os.path.dirname(f)) for f in files if f.endswith(".safetensors")}
    return with_bin - with_safetensors


def find_unreadable_weights(path) -> tuple[str, str] | None:
    """In a local pipeline folder, the first weights file that cannot be read, and why: a ``*.safetensors`` whose
    header or size is broken, or a ``.bin`` that torch's weights-only unpickler refuses (or cannot read)."""

    for file in weight_files(path):
        try:
            if file.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            else:
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            if file.endswith(".safetensors"):
                return file, f"it is truncated or corrupt ({err}); re-download it or re-save the pipeline."
            return file, ("torch's weights-only unpickler refused it: it holds objects other than tensors (a pickle "
                          f"that would run code, or a damaged file: {str(err).splitlines()[0][:160]}). Nothing in "
                          "it was run; use a pipeline saved with safetensors.")
    return None
