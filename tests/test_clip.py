"""``training/train_clip.py`` on a tiny image-caption set, and ``ldm.eval.clip_metrics`` on what it trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script

pytestmark = pytest.mark.usefixtures("single_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_clip.py"
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (240, 220, 20)}
SHAPES = ("square", "disc")


def render(colour, shape, style):
    yy, xx = np.mgrid[:32, :32]
    inside = (abs(yy - 16) < 9) & (abs(xx - 16) < 9) if shape == "square" else (yy - 16) ** 2 + (xx - 16) ** 2 < 81
    image = np.full((32, 32, 3), 255, np.uint8)
    image[inside] = COLOURS[colour] if style == 0 else tuple(int(c * 0.7) for c in COLOURS[colour])
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    data = root / "data" / "train"
    data.mkdir(parents=True)
    concepts = []
    with open(data / "metadata.jsonl", "w") as f:
        for colour in COLOURS:
            for shape in SHAPES:
                captions = [f"a {colour} {shape}", f"{colour} {shape}", f"a {colour} {shape} emoji"]
                concepts.append(captions)
                for style in (0, 1):
                    name = f"{colour}-{shape}-{style}.png"
                    render(colour, shape, style).save(data / name)
                    f.write(json.dumps({"file_name": name, "text": captions, "hexcode": f"{colour}-{shape}"}) + "\n")
    script = load_script(SCRIPT, "train_clip")
    args = script.parse_args([
        "--train_data_dir", str(root / "data"), "--output_dir", str(root / "clip"), "--resolution", "32",
        "--patch_size", "8", "--text_width", "32", "--text_layers", "1", "--vision_width", "32",
        "--vision_layers", "1", "--heads", "2", "--projection_dim", "32", "--num_merges", "40",
        "--train_batch_size", "8", "--max_train_steps", "300", "--max_shift", "2", "--learning_rate", "3e-3",
        "--lr_warmup_steps", "5",
        "--checkpointing_steps", "150", "--report_to", "tensorboard", "--cache_dir", str(root / "hf"),
    ])
    script.main(args)
    return {"root": root, "out": root / "clip", "data": data, "concepts": concepts}


def logged_losses(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("loss")]


def test_contrastive_loss_goes_down(trained):
    losses = logged_losses(trained["out"])
    assert len(losses) == 300
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_text_tower_is_saved_as_a_pipeline_text_encoder(trained):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(trained["out"]).eval()
    text = CLIPTextModel.from_pretrained(trained["out"] / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(trained["out"] / "tokenizer")
    assert tok.model_max_length == 77 and text.config.max_position_embeddings == 77
    ids = tok(["a red square", "a blue disc"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(text(ids)[0], clip.text_model(ids)[0], rtol=0, atol=0)


def test_retrieval_is_near_perfect_on_the_clips_own_training_renders(trained):
    from transformers import CLIPModel, CLIPTokenizer

    from ldm.data.image_caption import image_to_tensor
    from ldm.eval.clip_metrics import clip_score, concept_embeddings, image_embeddings, retrieval, text_embeddings

    clip = CLIPModel.from_pretrained(trained["out"]).eval()
    tok = CLIPTokenizer.from_pretrained(trained["out"] / "tokenizer")
    rows = [json.loads(line) for line in (trained["data"] / "metadata.jsonl").read_text().splitlines()]
    pixels = torch.stack([image_to_tensor(Image.open(trained["data"] / r["file_name"]).convert("RGB"), 32)
                          for r in rows])
    names = [c[0] for c in trained["concepts"]]
    targets = torch.tensor([names.index(r["text"][0]) for r in rows])
    images = image_embeddings(clip, pixels)
    found = retrieval(images, concept_embeddings(clip, tok, trained["concepts"]), targets)
    assert found["top5"] == 1.0 and found["top1"] >= 0.9
    own = clip_score(images, text_embeddings(clip, tok, [r["text"][0] for r in rows]))
    other = clip_score(images, text_embeddings(clip, tok, [r["text"][0] for r in rows[::-1]]))
    assert own.mean() > other.mean() + 5


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    from ldm.eval.clip_metrics import frechet_distance

    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.05)  # |mean shift|^2, same covariance


def test_reports_of_several_seeds_pool_weighted_by_their_prompts():
    from ldm.eval.emoji_suite import pool_reports

    one = {"train": {"n": 96, "top1": 0.5, "top5": 0.75, "clip_score_ratio": 0.9, "seconds_per_image": 1.0},
           "natural": {"n": 30, "top1": 0.2, "top5": 0.6, "clip_score_ratio": 0.8, "seconds_per_image": 1.0}}
    two = {"train": {"n": 32, "top1": 0.25, "top5": 0.5, "clip_score_ratio": 0.7, "seconds_per_image": 3.0}}
    pooled = pool_reports([one, two])
    assert pooled["train"]["n"] == 128 and pooled["train"]["top1"] == pytest.approx((48 + 8) / 128)
    assert pooled["train"]["top5"] == pytest.approx((72 + 16) / 128)
    assert pooled["train"]["clip_score_ratio"] == pytest.approx((96 * 0.9 + 32 * 0.7) / 128)
    assert pooled["train"]["top5_per_seed"] == [0.75, 0.5] and pooled["natural"]["n"] == 30
    assert "heldout" not in pooled
