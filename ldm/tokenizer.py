"""The project's own CLIP-format tokenizer (no Hub download needed).

A byte-level BPE with CLIP's ``</w>`` end-of-word suffix, trained with the ``tokenizers`` library on a
synthetic caption corpus, laid out like OpenAI's vocab (256 byte symbols, the same with ``</w>``, one entry per
merge, ``<|startoftext|>``, ``<|endoftext|>``) and saved as ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` (``model_max_length: 77``), so transformers' ``CLIPTokenizer`` loads it. Every byte is in
the vocab: any text tokenizes without unknown tokens.

The shipped copy lives in ``ldm/assets/tokenizer``; rebuild it with ``python -m ldm.tokenizer``.
On real data pass a pretrained tokenizer/text encoder from the Hub instead (e.g. ``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

# transformers' CLIPTokenizer pre-tokenizer: the merges learnt here are only the merges it applies if they match.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

_COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "grey",
           "brown", "cyan", "magenta", "golden", "silver", "dark", "light"]
_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cube", "sphere", "ring", "cross", "heart",
           "diamond", "line", "spiral", "shape", "rectangle"]
_ANIMALS = ["fox", "cat", "dog", "horse", "bird", "owl", "rabbit", "bear", "wolf", "deer", "fish", "lion"]
_SIZES = ["small", "medium", "large", "tiny", "big", "huge"]
_POSITIONS = ["in the top left", "at the top", "in the top right", "on the left", "in the center",
              "in the middle", "on the right", "in the bottom left", "at the bottom", "in the bottom right"]
_PLACES = ["a blue background", "a white background", "a black background", "a gray background",
           "a dark background", "the grass", "a beach", "the snow", "a wooden table", "a city street", "the sky",
           "a forest", "the water", "a red wall", "a field of flowers"]
_STYLES = ["a photo of", "a painting of", "a drawing of", "a picture of", "an illustration of", "pixel art of"]


def caption_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic synthetic captions ("a small red circle in the top left on a white background", ...)."""
    rng = random.Random(seed)
    caps = []
    for _ in range(n):
        c1, c2 = rng.choice(_COLORS), rng.choice(_COLORS)
        s1, s2 = rng.choice(_SHAPES), rng.choice(_SHAPES)
        k = rng.random()
        if k < 0.4:
            caps.append(f"a {rng.choice(_SIZES)} {c1} {s1} {rng.choice(_POSITIONS)} on {rng.choice(_PLACES)}")
        elif k < 0.6:
            caps.append(f"a {c1} {s1} and a {c2} {s2} on {rng.choice(_PLACES)}")
        elif k < 0.8:
            caps.append(f"{rng.choice(_STYLES)} a {rng.choice(_SIZES)} {c1} {rng.choice(_ANIMALS)} "
                        f"on {rng.choice(_PLACES)}")
        else:
            caps.append(f"the {rng.choice(_ANIMALS)} is {c1}; it's next to a {c2} {s2}. {rng.randint(1, 9)}0% zoom!")
    return caps


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes of GPT-2/CLIP byte-level BPE, in CLIP's order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def train_clip_bpe(captions: list[str], num_merges: int = 600) -> tuple[dict[str, int], list[str]]:
    """Learn CLIP-format BPE merges on ``captions``; return (vocab, merges) in OpenAI CLIP's layout."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    byte_syms = _bytes_to_unicode()
    trainer = trainers.BpeTrainer(
        vocab_size=2 * 256 + num_merges + 2, min_frequency=2, show_progress=False,
        initial_alphabet=byte_syms, end_of_word_suffix="</w>", special_tokens=[BOS, EOS],
    )
    tok.train_from_iterator(captions, trainer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    merges = merges[:num_merges]
    vocab: dict[str, int] = {}
    for sym in byte_syms + [b + "</w>" for b in byte_syms]:
        vocab.setdefault(sym, len(vocab))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder: str | Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write ``vocab.json``, ``merges.txt`` and a ``tokenizer_config.json`` with ``model_max_length: 77``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,  # without it transformers uses 1e30 and pipelines pad to nonsense
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(folder: str | Path = TOKENIZER_DIR):
    """The shipped (or a given) CLIP-format tokenizer folder as a transformers ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train and write the project's CLIP-format BPE tokenizer.")
    parser.add_argument("--output_dir", default=str(TOKENIZER_DIR))
    parser.add_argument("--num_captions", type=int, default=3000)
    parser.add_argument("--num_merges", type=int, default=600)
    args = parser.parse_args()
    vocab, merges = train_clip_bpe(caption_corpus(args.num_captions), args.num_merges)
    write_tokenizer_files(args.output_dir, vocab, merges)
    tok = load_tokenizer(args.output_dir)
    print(f"wrote {args.output_dir}: {len(tok)} tokens; 'a red fox' -> "
          f"{tok.convert_ids_to_tokens(tok('a red fox').input_ids)}")


if __name__ == "__main__":
    main()
