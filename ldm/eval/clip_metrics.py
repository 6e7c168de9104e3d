"""Metrics in the embedding space of a (project-trained) transformers ``CLIPModel``.

* ``retrieval``: for each image, the rank of its own concept among all concepts by image-text similarity (top-1 /
  top-5 accuracy), each concept represented by the mean of its captions' unit text embeddings.
* ``clip_score``: 100 x max(cos(image, text), 0), as torchmetrics' CLIPScore, with this CLIP.
* ``frechet_distance``: the Fréchet distance between Gaussians fitted to two sets of CLIP image embeddings. An
  in-domain distance in this CLIP's space, not Inception FID: compare it only with figures from the same CLIP.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def text_embeddings(clip, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit CLIP text embeddings (N, P) of ``texts``."""
    out = []
    for i in range(0, len(texts), batch_size):
        # padded to the batch's longest text only: CLIP's causal text tower pools at the end-of-text token, which
        # padding after it does not change
        enc = tokenizer(texts[i:i + batch_size], padding=True, max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        emb = clip.get_text_features(input_ids=enc.input_ids.to(clip.device),
                                     attention_mask=enc.attention_mask.to(clip.device))
        emb = getattr(emb, "pooler_output", emb)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def image_embeddings(clip, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit CLIP image embeddings (N, P) of ``pixels`` (N, 3, H, W) in [-1, 1] (the project CLIP's input range)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        emb = clip.get_image_features(pixel_values=pixels[i:i + batch_size].to(clip.device, clip.dtype))
        emb = getattr(emb, "pooler_output", emb)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def concept_embeddings(clip, tokenizer, caption_lists: list[list[str]]) -> torch.Tensor:
    """One unit embedding (K, P) per concept: the normalised mean of its captions' text embeddings."""
    flat = [c for captions in caption_lists for c in captions]
    emb = text_embeddings(clip, tokenizer, flat)
    out, i = [], 0
    for captions in caption_lists:
        out.append(emb[i:i + len(captions)].mean(0))
        i += len(captions)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def retrieval(image_emb: torch.Tensor, concept_emb: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracy of finding each image's concept (``targets`` (N,) indices into ``concept_emb`` (K, P))."""
    sims = image_emb @ concept_emb.T  # (N, K)
    rank = (sims > sims.gather(1, targets[:, None])).sum(1)  # 0 = the true concept is the most similar
    return {f"top{k}": float((rank < k).float().mean()) for k in ks} | {"ranks": rank.tolist()}


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per pair (N,): 100 x max(cos, 0) of matching rows of two unit-embedding tensors."""
    return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to embeddings ``a`` (N, P) and ``b`` (M, P)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(cov_a cov_b) = sum of sqrt(eigenvalues of S cov_b S), S = cov_a^(1/2) (both symmetric PSD)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
