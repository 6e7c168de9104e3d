"""Training data helpers: caption/image checks, bad-row dropping (map-style and streaming), the image transform."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from ldm.data.image_caption import (
    DataArgs, ImageCaptionCollator, StreamingRowFilter, drop_bad_rows, image_to_tensor, load_raw_dataset,
    pick_caption, prepare_training_dataset, row_problem,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def png_bytes(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {"bytes": png_bytes(), "path": None}
TRUNCATED = {"bytes": png_bytes()[:200], "path": None}


@pytest.mark.parametrize("value, expected", [
    ("  a red fox ", "a red fox"), ("", None), ("   ", None), (None, None), (3, None),
    (["", "  ", "a fox", "a dog"], "a fox"), ([], None),
])
def test_pick_caption(value, expected):
    assert pick_caption(value) == expected


def test_row_problem():
    assert row_problem(GOOD, "a fox") is None
    assert row_problem(GOOD, " ") == "no_caption"
    assert row_problem(TRUNCATED, "a fox") == "bad_image"
    assert row_problem({"bytes": b"not an image", "path": None}, "a fox") == "bad_image"
    assert row_problem({"bytes": None, "path": "/no/such/file.png"}, "a fox") == "bad_image"


def test_image_to_tensor_resizes_the_short_side_and_centre_crops():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[:, 20:60] = 255  # a white centre band exactly as wide as the crop
    out = image_to_tensor(PIL.Image.fromarray(image), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out[:, :, 2:-2].min() > 0.9  # the crop is (almost) all band; bicubic rings only at the very edges
    gray = image_to_tensor(PIL.Image.new("RGB", (32, 32), (255, 0, 0)), 32)
    torch.testing.assert_close(gray[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_drop_bad_rows_counts_by_reason():
    ds = datasets.Dataset.from_dict({
        "image": [GOOD, GOOD, TRUNCATED, GOOD, TRUNCATED],
        "text": ["a", "", "b", "c", ""],
    }, features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}))
    kept, counts = drop_bad_rows(ds, "image", "text")
    assert kept["text"] == ["a", "c"]
    assert counts == {"no_caption": 2, "bad_image": 1}  # a row with both problems counts as captionless


def test_streaming_filter_attaches_counts_to_the_next_good_row():
    filt = StreamingRowFilter("image", "text")
    out = filt({"image": [TRUNCATED, GOOD, GOOD], "text": ["a", "b", ""]})
    assert out["text"] == ["b"] and out["skipped_bad_image"] == [1] and out["skipped_no_caption"] == [1]
    out = filt({"image": [GOOD], "text": [""]})  # no good row: the count waits for the next batch
    assert out["text"] == [] and out["skipped_no_caption"] == []
    out = filt({"image": [GOOD, GOOD], "text": ["c", "d"]})
    assert out["skipped_no_caption"] == [1, 0] and out["skipped_bad_image"] == [0, 0]


def test_collator_batches_pixels_captions_and_counts():
    rows = [{"image": GOOD, "text": " a fox ", "skipped_bad_image": 2}, {"image": GOOD, "text": ["", "a dog"]}]
    batch = ImageCaptionCollator("image", "text", 32)(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["captions"] == ["a fox", "a dog"]
    assert batch["skipped_bad_image"].tolist() == [2, 0] and batch["skipped_no_caption"].tolist() == [0, 0]


@pytest.fixture
def folder(tmp_path):
    """An imagefolder of 3 rows; every caption empty."""
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i in range(3):
            (tmp_path / f"{i}.png").write_bytes(png_bytes(seed=i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": ""}) + "\n")
    return tmp_path


def test_no_usable_rows_is_a_clear_error(folder, tmp_path_factory):
    args = DataArgs(train_data_dir=str(folder), resolution=32, cache_dir=str(tmp_path_factory.mktemp("hf")))
    with pytest.raises(ValueError, match="No usable rows"):
        prepare_training_dataset(args)


def test_unknown_column_names_the_columns(folder, tmp_path_factory):
    args = DataArgs(train_data_dir=str(folder), caption_column="caption", resolution=32,
                    cache_dir=str(tmp_path_factory.mktemp("hf")))
    with pytest.raises(ValueError, match=r"--caption_column: no column 'caption'.*\['image', 'text'\]"):
        load_raw_dataset(args)


def test_no_data_source_is_a_clear_error():
    with pytest.raises(ValueError, match="--dataset_name .* or --train_data_dir"):
        load_raw_dataset(DataArgs())


def test_list_captions_draw_one_caption_per_step_the_same_with_and_without_the_cache(tmp_path):
    """A row with a list of captions trains on one of them per step, drawn from the step generator; the latent
    cache (which then stores token ids, not embeddings) gives exactly the batches encoding on the fly gives."""
    from ldm.data.latent_cache import cache_latents_and_text
    from ldm.tiny import tiny_text_encoder, tiny_vae
    from ldm.tokenizer import load_tokenizer
    from ldm.training_step import BatchEncoder

    folder = tmp_path / "data"
    folder.mkdir()
    lists = [["a red fox", "fox", "a fox emoji"], ["a cat"], ["pizza", "a slice of pizza"], ["sun", "the sun"]]
    with open(folder / "metadata.jsonl", "w") as f:
        for i, captions in enumerate(lists):
            (folder / f"{i}.png").write_bytes(png_bytes(32, 32, seed=i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": captions}) + "\n")
    ds, collator, _ = prepare_training_dataset(DataArgs(train_data_dir=str(folder), resolution=32,
                                                        cache_dir=str(tmp_path / "hf")))
    tok = load_tokenizer()
    vae, text = tiny_vae(), tiny_text_encoder(load_tokenizer())
    encoder = BatchEncoder(vae, text, tok, random_flip=True)
    rows = [ds[i] for i in range(len(ds))]
    raw = collator(rows)
    cached_ds = cache_latents_and_text(ds, collator, vae, text, tok, str(tmp_path / "cache"), True)
    cached = {k: torch.stack([cached_ds[i][k] for i in range(len(ds))]) for k in cached_ds.column_names}
    assert "caption_ids" in cached and "prompt_embeds" not in cached
    seen = set()
    for step in range(12):
        a = encoder(raw, torch.Generator().manual_seed(step))
        b = encoder(cached, torch.Generator().manual_seed(step))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        seen.add(tuple(a[1][:, 1].sum(-1).tolist()))  # the first real token differs between the captions
    assert len(seen) > 1  # different captions on different steps
    single = {"pixel_values": raw["pixel_values"], "captions": ["a red fox"] * 4,
              "caption_lists": [["a red fox"]] * 4}
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    encoder(single, g1)  # single captions take no caption draw: the stream goes on as without lists
    encoder({k: v for k, v in single.items() if k != "caption_lists"}, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_bad_metadata_lines_are_counted_skips_not_a_crash(tmp_path):
    """A caption of another type, a malformed JSON line, a ../ or absolute file_name, a FIFO named *.png: each is a
    counted skip; the good rows train."""
    import os

    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png_bytes(seed=i))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a fox {i}"}))
    lines += [json.dumps({"file_name": "0.png", "text": 5}), json.dumps({"file_name": "1.png", "text": True}),
              json.dumps({"file_name": "2.png", "text": ["a fox", 3]}), '{"file_name": "3.png", "text": "a cat"',
              json.dumps({"file_name": "../secret.png", "text": "x"}),
              json.dumps({"file_name": str(folder / "0.png"), "text": "x"}), json.dumps({"text": "no file"})]
    os.mkfifo(folder / "fifo.png")
    lines.append(json.dumps({"file_name": "fifo.png", "text": "a pipe"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds, collator, skipped = prepare_training_dataset(DataArgs(train_data_dir=str(folder), resolution=32,
                                                              cache_dir=str(tmp_path / "hf")))
    assert len(ds) == 5  # 4 good rows + the list with one string caption ("a fox")
    assert skipped == {"no_caption": 2, "bad_row": 4, "bad_image": 1}
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)


def test_an_empty_metadata_file_is_a_clear_error(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="its metadata.jsonl has no usable line"):
        prepare_training_dataset(DataArgs(train_data_dir=str(tmp_path), resolution=32))


@pytest.mark.parametrize("mode, array", [
    ("I;16", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)),
    ("F", np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32)),
])
def test_high_bit_depth_images_are_scaled_not_clipped(mode, array):
    from ldm.data.image_caption import decode_image

    image = PIL.Image.fromarray(array)
    assert image.mode == mode
    rgb = np.asarray(decode_image(image)).astype(float)
    assert rgb.shape == (64, 64, 3)
    assert 120 < rgb.mean() < 135 and rgb.min() == 0 and rgb.max() == 255  # the ramp's mid-grey, not all white


def test_balance_by_draws_every_value_equally_often_and_every_process_shares_one_draw(tmp_path):
    """``--balance_by COLUMN``: each value of the column comes up equally often (a concept with 8 renders as often as
    one with 2), the draw is a function of (seed, epoch) only, and accelerate's two-process sharding hands each
    process its share of that one draw (together they are the single-process epoch). A missing column or a stream is
    a clear error."""
    from collections import Counter

    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader

    from ldm.data.loader import make_train_dataloader

    folder = tmp_path / "data"
    folder.mkdir()
    rows = [(f"person {i}", "people") for i in range(8)] + [("fox a", "fox"), ("fox b", "fox"), ("sun a", "sun"),
                                                             ("sun b", "sun")]
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (caption, concept) in enumerate(rows):
            (folder / f"{i}.png").write_bytes(png_bytes(16, 16, seed=i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption, "concept": concept}) + "\n")
    args = DataArgs(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "hf"), seed=3,
                    balance_by="concept")
    loader, _ = make_train_dataloader(PartialState(), args, None, None, None, batch_size=2)

    def epoch(dataloader, number: int) -> list[list[str]]:
        (dataloader.set_epoch if hasattr(dataloader, "set_epoch") else dataloader.sampler.set_epoch)(number)
        return [batch["captions"] for batch in dataloader]

    drawn = Counter(c.split()[0] for e in range(50) for batch in epoch(loader, e) for c in batch)
    assert sum(drawn.values()) == 600
    for concept in ("person", "fox", "sun"):  # 200 each expected (binomial sd 11.5); unbalanced: 400 / 100 / 100
        assert 150 < drawn[concept] < 250, drawn
    assert epoch(loader, 7) == epoch(loader, 7) != epoch(loader, 8)
    shards = [prepare_data_loader(loader, num_processes=2, process_index=i, use_seedable_sampler=True, data_seed=3)
              for i in range(2)]
    for number in (0, 5):
        first, second = (epoch(shard, number) for shard in shards)
        assert [b for pair in zip(first, second) for b in pair] == epoch(loader, number)

    with pytest.raises(ValueError, match=r"no column 'hexcode'; its columns are \[.*'concept'"):
        make_train_dataloader(PartialState(), DataArgs(**{**vars(args), "balance_by": "hexcode"}), None, None, None, 2)
    with pytest.raises(ValueError, match="needs a map-style data set"):
        make_train_dataloader(PartialState(), DataArgs(**{**vars(args), "streaming": True}), None, None, None, 2)
