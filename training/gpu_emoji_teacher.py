#!/usr/bin/env python
"""Assemble the denoiser that ``training/gpu_emoji_teacher.sh`` trained on a GPU into a full emoji pipeline.

    python training/gpu_emoji_teacher.py --denoiser <files_at>/denoiser --out work/emoji/teacher-gpu

The VAE, text encoder, tokenizer and trailing-DDIM scheduler are ``--base``'s (``models/emoji``); the denoiser
(float16 safetensors shards) is loaded back as float32. Evaluate the result with ``training/evaluate.py --suite
emoji --model work/emoji/teacher-gpu ...`` before shipping it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--denoiser", required=True, help="the denoiser folder the GPU run returned")
    p.add_argument("--base", default="models/emoji", help="the pipeline giving every other component")
    p.add_argument("--out", required=True, help="where the assembled pipeline is saved (float32)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(args.base)
    cls = type(pipe.denoiser)
    denoiser = cls.from_pretrained(args.denoiser, use_safetensors=True)
    if denoiser.config.cross_attention_dim != pipe.denoiser.config.cross_attention_dim:
        raise ValueError(f"{args.denoiser} attends to width {denoiser.config.cross_attention_dim}, but {args.base}'s "
                         f"text encoder gives {pipe.denoiser.config.cross_attention_dim}: it was not trained on it.")
    pipe.denoiser = denoiser.float()
    pipe.save_pretrained(args.out)
    return Path(args.out)


if __name__ == "__main__":
    print(main(parse_args()))
