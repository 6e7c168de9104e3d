"""Image-caption data for training: loading (Hub, local script, imagefolder, built-in), bad-row handling, transforms.

Rows without a usable caption or with an image PIL cannot decode are dropped and counted, never a crash mid-run:

* map-style data sets are checked once up front (``drop_bad_rows``; the result is cached by ``datasets``);
* streaming data sets are checked lazily, and the counts travel with the batches (``skipped_*`` fields).

Images become ``pixel_values`` (3, R, R) in [-1, 1]: shorter side resized to R, centre-cropped. Random horizontal
flips are left to the training step, which draws them from its own seeded generator (so a resumed run repeats them).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

SKIP_REASONS = ("no_caption", "bad_image", "bad_row")  # bad_row: a malformed metadata line or an unsafe file_name
_CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
BUILTIN_DATASETS = ("shapes",)


@dataclass
class DataArgs:
    """Where the data comes from and how images are prepared (mirrors the training script's flags)."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    streaming: bool = False
    max_train_samples: int | None = None
    resolution: int = 256
    cache_dir: str | None = None
    seed: int = 0
    shuffle_buffer_size: int = 1000
    balance_by: str | None = None  # a column whose values are drawn equally often (``ldm.data.loader``)


    @classmethod
    def from_args(cls, args, resolution: int | None = None) -> "DataArgs":
        """From a script's parsed :func:`add_data_arguments` (``resolution`` overrides ``args.resolution``)."""
        return cls(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column,
                   args.caption_column, getattr(args, "streaming", False), args.max_train_samples,
                   resolution or args.resolution, args.cache_dir, args.seed,
                   balance_by=getattr(args, "balance_by", None))


def add_data_arguments(parser, resolution: int | None, resolution_help: str = "training image size",
                       streaming: bool = False, balance: bool = False):
    """The data flags every training script takes (``train_t2i.py``, ``train_vae.py``, ``distill.py``); ``streaming``
    and ``balance`` add ``--streaming`` and ``--balance_by`` for the scripts that support them."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub id, local dataset folder, or 'shapes' (built in)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="imagefolder with a metadata.jsonl of captions")
    g.add_argument("--image_column", default=None)
    g.add_argument("--caption_column", default=None)
    if streaming:
        g.add_argument("--streaming", action="store_true", help="stream the data set (needs --max_train_steps)")
    if balance:
        g.add_argument("--balance_by", default=None, metavar="COLUMN",
                       help="draw rows so that every value of this column comes up equally often (with replacement; "
                            "an epoch is still one draw per row), e.g. hexcode for the emoji data: a concept with "
                            "12 skin-tone renders as often as one with 2")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=resolution, help=resolution_help)
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--cache_dir", default=None, help="datasets cache folder")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    return g


def load_raw_dataset(args: DataArgs, split: str = "train"):
    """The data set (map-style or streaming) with its image column left undecoded, the resolved column names, and
    the Counter of metadata lines an imagefolder could not use (``bad_row``)."""
    import datasets

    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Give either --dataset_name or --train_data_dir, not both.")
    dropped = Counter()
    if args.dataset_name in BUILTIN_DATASETS:
        from .shapes import load_shapes_dataset

        ds = load_shapes_dataset(split=split, num_samples=args.max_train_samples or 10_000,
                                 resolution=args.resolution, seed=args.seed, cache_dir=args.cache_dir)
        if args.streaming:
            ds = ds.to_iterable_dataset()
    elif args.dataset_name is not None:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=split,
                                   cache_dir=args.cache_dir, streaming=args.streaming)
    elif args.train_data_dir is not None:
        ds, dropped = read_imagefolder(args.train_data_dir, split, args.caption_column)
        ds = ds.to_iterable_dataset() if args.streaming else ds
    else:
        raise ValueError("Give the training data: --dataset_name (Hub id, local dataset folder/script or 'shapes') "
                         "or --train_data_dir (an imagefolder with a metadata.jsonl of captions).")

    columns = list(ds.features) if ds.features is not None else list(next(iter(ds)).keys())
    image_column = args.image_column or next(
        (c for c in columns if isinstance((ds.features or {}).get(c), datasets.Image)), "image")
    caption_column = args.caption_column or next((c for c in _CAPTION_COLUMNS if c in columns), None)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"{flag}: no column {column!r} in the data set; its columns are {columns}.")
    if isinstance((ds.features or {}).get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    if args.max_train_samples is not None and args.dataset_name not in BUILTIN_DATASETS:
        ds = ds.take(args.max_train_samples) if args.streaming else \
            ds.select(range(min(args.max_train_samples, len(ds))))
    return ds, image_column, caption_column, dropped


def read_imagefolder(folder: str, split: str = "train", caption_column: str | None = None):
    """An ``imagefolder`` (PNGs + ``metadata.jsonl``; ``<folder>/<split>/`` when the folder has split folders) as
    a map-style data set of undecoded images and caption lists, read line by line so one bad row cannot abort the
    set: a malformed JSON line or a ``file_name`` outside the folder is dropped and counted (``bad_row``), a caption
    that is not a string (or list of strings) becomes no caption (counted later as ``no_caption``). Returns the data
    set and the Counter of dropped rows."""
    import datasets

    root = check_imagefolder(folder, split)
    rows, skipped, columns = [], Counter(), {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for number, line in enumerate(meta.read_text(errors="replace").splitlines(), 1):
            row = _metadata_row(meta, number, line, root, skipped, caption_column)
            if row is not None:
                rows.append(row)
                columns.update(dict.fromkeys(row))
    if not rows:
        raise ValueError(f"--train_data_dir {folder}: its metadata.jsonl has no usable line ({dict(skipped)} dropped);"
                         ' each line must be {"file_name": "0001.png", "text": "a caption"}.')
    features = _uniform_columns(rows, list(columns))
    if sum(skipped.values()):
        logger.warning("Dropped %d metadata lines of %s: %s", sum(skipped.values()), folder, dict(skipped))
    return datasets.Dataset.from_list(rows, features=features), skipped


def _uniform_columns(rows: list[dict], columns: list[str]):
    """Give every row every column, in one type per column (JSON lets rows disagree; Arrow does not): the image,
    lists of strings where every row has a list, strings otherwise. Returns the features."""
    import datasets

    lists = {k for k in columns if k != "image" and any(isinstance(r.get(k), list) for r in rows)
             and all(isinstance(r.get(k), list) or r.get(k) is None for r in rows)}
    for row in rows:
        for key in columns:
            value = row.get(key)
            if key == "image":
                continue
            if key in lists:
                row[key] = [v if isinstance(v, str) else json.dumps(v) for v in value or []]
            else:
                row[key] = None if value is None else value if isinstance(value, str) else json.dumps(value)
    return datasets.Features({k: datasets.Image(decode=False) if k == "image" else
                              datasets.Sequence(datasets.Value("string")) if k in lists else
                              datasets.Value("string") for k in columns})


def _metadata_row(meta: Path, number: int, line: str, root: Path, skipped: Counter,
                  caption_column: str | None = None) -> dict | None:
    """One metadata line -> a row (``image`` path, ``text`` caption list, the other columns), or None (counted)."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
        name = row.pop("file_name")
        path = (meta.parent / name).resolve()
        if not isinstance(name, str) or os.path.isabs(name) or not path.is_relative_to(root.resolve()):
            raise ValueError(f"file_name {name!r} points outside {root}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        skipped["bad_row"] += 1
        logger.debug("%s line %d dropped: %s", meta, number, err)
        return None
    column = caption_column or next((c for c in _CAPTION_COLUMNS if c in row), "text")
    captions = {column: caption_options(row[column])} if column in row else {}
    return {"image": {"path": str(path), "bytes": None}, **row, **captions}


def check_imagefolder(folder: str, split: str = "train") -> Path:
    """A clear error for an ``--train_data_dir`` that is missing or has no captions file."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--train_data_dir {folder} is not a folder.")
    if (root / split / "metadata.jsonl").is_file():
        root = root / split
    if not any(root.rglob("metadata.jsonl")):
        raise ValueError(
            f"--train_data_dir {folder} has no metadata.jsonl, so its images have no captions. Add one line per "
            'image: {"file_name": "0001.png", "text": "a red fox"} ("text" may also be a list of captions, one of '
            "which is drawn per step); see datasets' imagefolder documentation.")
    return root


def pick_caption(value) -> str | None:
    """A row's caption: a non-empty string, or the first non-empty one of a list; None when there is none."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def caption_options(value) -> list[str]:
    """Every usable caption of a row: the string itself, or the non-empty strings of a list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def decode_image(value) -> Image.Image:
    """An undecoded ``datasets.Image`` value ({"bytes", "path"}), a PIL image or a path -> RGB PIL image.

    Raises OSError/ValueError (PIL's errors) when the image cannot be decoded.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, (dict, str)):
        path = value["path"] if isinstance(value, dict) else value
        if not os.path.isfile(path):  # a FIFO or device named *.png would block the read forever
            raise ValueError(f"{path} is not a regular file")
        image = Image.open(path)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()
    return to_rgb8(image)


def to_rgb8(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; 16-bit, 32-bit integer and float images are scaled, not clipped (PIL's
    ``convert("RGB")`` maps a 0..65535 ramp to almost all white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or (image.mode == "I" and array.max() <= 65535) else \
            1.0 if image.mode == "F" and array.max() <= 1.0 else float(max(array.max(), 1.0))
        image = Image.fromarray((array / top * 255).clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def row_problem(image_value, caption_value) -> str | None:
    """Why a row cannot be trained on ("no_caption", "bad_image"), or None when it is fine."""
    if pick_caption(caption_value) is None:
        return "no_caption"
    try:
        decode_image(image_value)
    except Exception:  # PIL raises many types for broken files
        return "bad_image"
    return None


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, R, R) float tensor in [-1, 1]: shorter side resized to R (bicubic), centre crop."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def drop_bad_rows(ds, image_column: str, caption_column: str, num_proc: int | None = None):
    """Map-style data set -> (data set without bad rows, Counter of skipped rows by reason). Logs the counts."""
    def problems(batch):
        return {"_problem": [row_problem(img, cap) or "" for img, cap in
                             zip(batch[image_column], batch[caption_column])]}

    checked = ds.map(problems, batched=True, num_proc=num_proc, desc="Checking rows")
    counts = Counter(p for p in checked["_problem"] if p)
    kept = checked.filter(lambda p: not p, input_columns="_problem", num_proc=num_proc).remove_columns("_problem")
    log_skipped(counts, total=len(ds))
    return kept, counts


def log_skipped(counts: Counter, total: int | None = None) -> None:
    if sum(counts.values()):
        of = f" of {total}" if total is not None else ""
        logger.warning("Skipped %d rows%s: %d without a caption, %d with an undecodable image, %d bad metadata "
                       "lines.", sum(counts.values()), of, counts["no_caption"], counts["bad_image"],
                       counts["bad_row"])


class StreamingRowFilter:
    """Batched ``IterableDataset.map`` function: drops bad rows and attaches the counts to the next good row.

    Adds ``skipped_no_caption`` / ``skipped_bad_image`` int columns; summing them over the batches a process sees gives
    its number of dropped rows (rows dropped after the last good row are not reported).
    """

    def __init__(self, image_column: str, caption_column: str):
        self.image_column, self.caption_column = image_column, caption_column
        self.pending = Counter()

    def __call__(self, batch: dict) -> dict:
        keep = []
        for i, (img, cap) in enumerate(zip(batch[self.image_column], batch[self.caption_column])):
            problem = row_problem(img, cap)
            if problem:
                self.pending[problem] += 1
            else:
                keep.append(i)
        out = {k: [v[i] for i in keep] for k, v in batch.items()}
        for reason in SKIP_REASONS:
            out[f"skipped_{reason}"] = [0] * len(keep)
            if keep:
                out[f"skipped_{reason}"][0] = self.pending.pop(reason, 0)
        return out


class ImageCaptionCollator:
    """List of rows -> {"pixel_values": (B, 3, R, R), "captions": [B str] (the first of a list), "caption_lists":
    [B lists of str] (all of them), "skipped_*": (B,) counts}."""

    def __init__(self, image_column: str, caption_column: str, resolution: int):
        self.image_column, self.caption_column, self.resolution = image_column, caption_column, resolution

    def __call__(self, rows: list[dict]) -> dict:
        batch = {
            "pixel_values": torch.stack([image_to_tensor(decode_image(r[self.image_column]), self.resolution)
                                         for r in rows]),
            "captions": [pick_caption(r[self.caption_column]) for r in rows],
            "caption_lists": [caption_options(r[self.caption_column]) for r in rows],
        }
        for reason in SKIP_REASONS:
            batch[f"skipped_{reason}"] = torch.tensor([int(r.get(f"skipped_{reason}", 0)) for r in rows])
        return batch


def prepare_training_dataset(args: DataArgs, num_proc: int | None = None, split: str = "train"):
    """Load, check and shuffle-ready the data: returns (data set, collator, Counter of up-front skipped rows)."""
    ds, image_column, caption_column, dropped = load_raw_dataset(args, split)
    if args.streaming:
        ds = ds.map(StreamingRowFilter(image_column, caption_column), batched=True, batch_size=64)
        ds = ds.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        counts = dropped
    else:
        ds, counts = drop_bad_rows(ds, image_column, caption_column, num_proc=num_proc)
        counts.update(dropped)
        if len(ds) == 0:
            raise ValueError("No usable rows: every row lacks a caption or has an undecodable image.")
    return ds, ImageCaptionCollator(image_column, caption_column, args.resolution), counts
