"""Loading the frozen components (VAE, text encoder, tokenizer) and a saved pipeline's denoiser for training."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_frozen_components(pretrained: str | None, vae: str | None = None, text_encoder: str | None = None,
                           tokenizer: str | None = None, revision: str | None = None):
    """VAE, text encoder and tokenizer, frozen and in eval mode.

    Each comes from its own folder/Hub id when given, else from the ``vae/``, ``text_encoder/``, ``tokenizer/``
    subfolders of ``pretrained`` (a pipeline). The tokenizer defaults to the text encoder's folder.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    def source(explicit, subfolder):
        if explicit:
            return explicit, ""  # transformers wants "" (not None) for "no subfolder"
        if pretrained is None:
            raise ValueError(f"No {subfolder}: give --{subfolder} or --pretrained_model_name_or_path.")
        return pretrained, subfolder

    path, sub = source(vae, "vae")
    vae_model = AutoencoderKL.from_pretrained(path, subfolder=sub, revision=revision, use_safetensors=True)
    path, sub = source(text_encoder, "text_encoder")
    text_model = CLIPTextModel.from_pretrained(path, subfolder=sub, revision=revision, use_safetensors=True)
    path, sub = source(tokenizer or text_encoder, "tokenizer")
    tok = CLIPTokenizer.from_pretrained(path, subfolder=sub, revision=revision)
    if tok.model_max_length > text_model.config.max_position_embeddings:
        raise ValueError(f"The tokenizer in {path} has model_max_length={tok.model_max_length}; add a "
                         f"tokenizer_config.json with model_max_length={text_model.config.max_position_embeddings}.")
    for model in (vae_model, text_model):
        model.requires_grad_(False).eval()
    return vae_model, text_model, tok


def load_pipeline_denoiser(pretrained: str, revision: str | None = None, **overrides):
    """The denoiser of a saved ``LatentPipeline`` (folder or Hub id), with optional config overrides."""
    import ldm
    from pipelines import LatentPipeline

    folder = pretrained if os.path.isdir(pretrained) else LatentPipeline.download(pretrained, revision=revision)
    _, class_name = json.loads(Path(folder, "model_index.json").read_text())["denoiser"]
    cls = getattr(ldm, class_name, None)
    if cls is None:
        raise ValueError(f"{pretrained}: the denoiser class {class_name!r} is not an ldm denoiser.")
    return cls.from_pretrained(folder, subfolder="denoiser", use_safetensors=True, **overrides)
