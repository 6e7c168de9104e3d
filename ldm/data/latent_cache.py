"""Precompute VAE latents and text embeddings once, so later epochs never run the frozen models.

The cache is an Arrow file written by ``datasets.Dataset.map`` (memory-mapped, reused across runs with the same data,
VAE, text encoder and resolution). Each row holds:

    latent_params       (2C, h, w)  the VAE posterior's [mean, logvar]: training draws z = mean + std * eps each step
                                    from its own generator (``--cache_latents_mode posterior``) or uses the mean
    latent_params_flip  (2C, h, w)  the same for the horizontally flipped image (only with random flips)
    prompt_embeds       (L, D)      text-encoder tokens of the caption
    prompt_mask         (L,)        its attention mask

When the caption column holds lists of several captions, the text cannot be encoded once: the rows then hold
``caption_ids`` (K, L) (the token ids of up to K captions, padded with rows of -1) instead of ``prompt_embeds`` /
``prompt_mask``, and training picks one caption per row and step and runs the (small, frozen) text encoder on it.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from datasets import Array2D, Array3D, Features, Sequence, Value

from ..latents import encode_posterior, vae_scale_factor
from .image_caption import ImageCaptionCollator


def encode_text(tokenizer, text_encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """B captions -> tokens (B, L, D) of the text encoder's last layer and the (B, L) attention mask."""
    enc = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    ids = enc.input_ids.to(text_encoder.device)
    return text_encoder(ids)[0], enc.attention_mask.to(text_encoder.device)


def max_caption_count(ds, caption_column: str) -> int:
    """The most usable captions any row of a map-style data set has (1 for plain string captions)."""
    from .image_caption import caption_options

    if isinstance(ds.features.get(caption_column), Value):
        return 1
    return max(len(caption_options(v)) for v in ds[caption_column])


def caption_id_rows(tokenizer, captions: list[str], rows: int) -> np.ndarray:
    """(rows, L) int32 token ids of ``captions`` padded to the tokenizer's length; missing rows are -1."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids.astype(np.int32)
    out = np.full((rows, tokenizer.model_max_length), -1, np.int32)
    out[: len(ids)] = ids[:rows]
    return out


def encode_ids(tokenizer, text_encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) padded to the tokenizer's length -> tokens (B, L, D) and the attention mask (B, L), the same
    as :func:`encode_text` gives for the captions they came from."""
    pad = tokenizer.pad_token_id
    ids = ids.long()
    first_eos = (ids == tokenizer.eos_token_id).int().argmax(1)
    mask = (torch.arange(ids.shape[1])[None] <= first_eos[:, None]).long()
    if pad != tokenizer.eos_token_id:
        mask = mask * (ids != pad).long()
    return text_encoder(ids.to(text_encoder.device))[0], mask.to(text_encoder.device)


def _fingerprint(ds, vae, text_encoder, tokenizer, resolution: int, flip: bool) -> str:
    parts = [ds._fingerprint, json.dumps(vae.config, sort_keys=True, default=str),
             json.dumps(text_encoder.config.to_dict(), sort_keys=True, default=str), str(len(tokenizer)),
             str(tokenizer.model_max_length), str(resolution), str(flip),
             str(sum(float(p.double().sum()) for p in vae.parameters())),
             str(sum(float(p.double().sum()) for p in text_encoder.parameters()))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@torch.no_grad()
def cache_latents_and_text(ds, collator: ImageCaptionCollator, vae, text_encoder, tokenizer, cache_dir: str,
                           random_flip: bool, batch_size: int = 16):
    """Map-style data set of checked rows -> the cached data set described in the module docstring."""
    os.makedirs(cache_dir, exist_ok=True)
    fingerprint = _fingerprint(ds, vae, text_encoder, tokenizer, collator.resolution, random_flip)
    factor = vae_scale_factor(vae)
    c, hw = 2 * vae.config.latent_channels, collator.resolution // factor
    length, width = tokenizer.model_max_length, text_encoder.config.hidden_size
    max_captions = max_caption_count(ds, collator.caption_column)
    features = {"latent_params": Array3D((c, hw, hw), "float32")}
    if max_captions > 1:
        features["caption_ids"] = Array2D((max_captions, length), "int32")
    else:
        features.update(prompt_embeds=Array2D((length, width), "float32"),
                        prompt_mask=Sequence(Value("int8"), length=length))
    if random_flip:
        features["latent_params_flip"] = Array3D((c, hw, hw), "float32")

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        data = collator(rows)
        pixels = data["pixel_values"]
        out = {"latent_params": encode_posterior(vae, pixels).float().cpu().numpy()}
        if random_flip:
            out["latent_params_flip"] = encode_posterior(vae, pixels.flip(-1)).float().cpu().numpy()
        if max_captions > 1:
            out["caption_ids"] = np.stack([caption_id_rows(tokenizer, options, max_captions)
                                           for options in data["caption_lists"]])
            return out
        embeds, mask = encode_text(tokenizer, text_encoder, data["captions"])
        out["prompt_embeds"] = embeds.float().cpu().numpy()
        out["prompt_mask"] = mask.cpu().numpy().astype(np.int8)
        return out

    return ds.map(
        encode, batched=True, batch_size=batch_size, remove_columns=ds.column_names, features=Features(features),
        cache_file_name=os.path.join(cache_dir, f"latents-{fingerprint}.arrow"), new_fingerprint=fingerprint,
        desc="Caching latents and text embeddings",
    ).with_format("torch")
