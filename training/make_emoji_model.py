#!/usr/bin/env python
"""Reproduce the bundled emoji models from scratch with the project's own scripts (one command, resumable).

    python training/make_emoji_model.py --work_dir work/emoji --output_dir models   # the default recipe
    python training/make_emoji_model.py --stages vae            # one stage (or several) at a time

The shipped models' recipe sets a few flags away from their defaults; both model cards print it
(:func:`reproduce_command`), and the README gives it.

Stages (each skipped when its output exists; the training stages resume from their last checkpoint, so an
interrupted command picks up where it stopped):

1. ``data``: ``python -m ldm.data.emoji``: Noto + Twemoji renders and emojibase captions from pinned npm tarballs;
2. ``clip``: ``train_clip.py``: a small CLIP on the training pairs (its text tower is the pipelines' text encoder, the
   whole CLIP scores the evaluation);
3. ``vae``: ``train_vae.py``: an ``AutoencoderKL`` with 16 x 16 x 4 latents of the 64 px renders;
4. ``teacher-unet``, ``teacher-dit``: ``train_t2i.py``: a U-Net and a DiT of about the same training FLOPs per image,
   the same steps, batch and recipe (v-prediction, zero-terminal SNR, cached latents, a caption drawn from each
   image's list every step, EMA, bf16 autocast);
5. ``evaluate-teachers``: ``evaluate.py --suite emoji`` on both; the better (held-out top-5) becomes the teacher;
6. ``continue-teacher``: the better teacher trained on to ``--long_teacher_steps`` from its last checkpoint, and
   evaluated the same way;
6b. ``refine-teacher`` (``--refine_steps``, 2,400 by default; 0 skips it): that teacher fine-tuned more with the
   training noise levels concentrated mid-way (``--weighting_scheme logit_normal``), where a sample commits to its
   layout, and evaluated again;
   ``--refine_from models/emoji`` refines the shipped teacher when the work folder's is gone;
6c. ``balance-teacher`` (``--balance_steps``, 2,400 by default; 0 skips it): the refined teacher (or ``--refine_from``
   when the work folder's is gone) refined again the same way with every value of ``--balance_by`` (``hexcode``: each
   concept) drawn equally often, into ``teacher-KIND-refine-balanced``, and evaluated again;
6d. ``perturb-teacher`` (``--perturb_steps``, 0 by default: skipped): the balanced teacher (or ``--refine_from``)
   trained on with the balance recipe plus ``--input_perturbation`` (DDPM-IP) into ``...-balanced-perturbed``, which
   then ships, and evaluated again;
6e. ``restyle-teacher`` (``--restyle_steps``, 0 by default: skipped): the perturbed teacher (or ``--refine_from``)
   trained on with the perturb recipe on the data built with ``--default_style`` (Noto: every Twemoji training
   caption names its style, so an unstyled prompt means Noto alone) into ``...-noto-default``, which then ships (and
   the student is distilled on that data), and evaluated again;
7. ``ship-teacher``: that teacher as ``models/emoji`` and the CLIP as ``models/emoji-clip`` (fp16, cards);
8. ``student``: ``distill.py``: guidance folded in over ``--guidance_range`` (1 to 8) on the teacher's
   ``--distill_teacher_steps`` grid, then halving rounds down to 4 steps; ``--distill_from models/emoji`` distils
   the shipped teacher when the work folder's teacher is gone; a run that only changes the rounds'
   ``--distill_steps`` copies the finished fold instead of training it again;
9. ``ship-student``: the emoji suite on the 4-step student, shipped as ``models/emoji-student`` with its card.

Precision: ``--mixed_precision auto`` (default) trains in bf16 on a GPU or a CPU with native bf16 (AVX512-BF16, AMX)
and in float32 elsewhere: an AVX2-only CPU emulates bf16, about 12x slower than float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

from ldm.checkpointing import latest_good_checkpoint
from ldm.data.emoji import STYLES
from ldm.eval.emoji_suite import NATURAL_PROMPTS
from ldm.recipes import add_recipe_arguments, run

STAGES = ("data", "clip", "vae", "teacher-unet", "teacher-dit", "evaluate-teachers", "continue-teacher",
          "refine-teacher", "balance-teacher", "perturb-teacher", "restyle-teacher", "ship-teacher",
          "student", "ship-student")
VALIDATION_PROMPTS = ("a red fox", "a slice of pizza", "a red apple", "a rocket")
ROUND_STEPS = 500  # the default steps of each halving round; its student folder's name leaves them out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="work/emoji")
    p.add_argument("--output_dir", default="models")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--npm_cache", default=None, help="where the npm tarballs are kept (default: ~/.cache/ldm/npm)")
    p.add_argument("--clip_steps", type=int, default=2500)
    p.add_argument("--vae_steps", type=int, default=2500)
    p.add_argument("--vae_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--long_teacher_steps", type=int, default=6000,
                   help="the chosen teacher continues to this many steps before shipping (a warm restart of the "
                        "cosine schedule at --teacher_steps; equal to --teacher_steps: no continuation)")
    p.add_argument("--refine_steps", type=int, default=2400,
                   help="steps of the refine-teacher stage (mid-noise logit-normal timesteps, learning rate 1e-4, "
                        "EMA 0.999; the shipped teacher's 2400); 0: no refinement, the continued teacher ships")
    p.add_argument("--refine_from", default=None,
                   help="the teacher pipeline the refine-teacher stage fine-tunes (default: the continued teacher "
                        "in --work_dir; e.g. models/emoji when that folder is gone), and balance-teacher when the "
                        "refined one is gone")
    p.add_argument("--balance_steps", type=int, default=2400,
                   help="steps of the balance-teacher stage (the refine recipe again, from the refined teacher, "
                        "drawing --balance_by equally often); 0: the refined teacher ships. More than a finished "
                        "run's: it trains on from its last checkpoint")
    p.add_argument("--balance_by", default="hexcode", metavar="COLUMN",
                   help="the data column the balance-teacher stage draws every value of equally often (hexcode: "
                        "each concept, however many renders it has; people are 59 %% of the renders, 20 %% of the "
                        "concepts)")
    p.add_argument("--perturb_steps", type=int, default=0,
                   help="steps of the perturb-teacher stage (the balance recipe again, from the balanced teacher, with "
                        "--input_perturbation); 0: skipped, the balanced teacher ships. More than a finished run's: "
                        "it trains on from its last checkpoint")
    p.add_argument("--input_perturbation", type=float, default=0.1,
                   help="the perturb-teacher stage's train_t2i.py --input_perturbation (DDPM-IP's gamma)")
    p.add_argument("--restyle_steps", type=int, default=0,
                   help="steps of the restyle-teacher stage (the perturb recipe again, from the perturbed teacher, on "
                        "the data built with --default_style); 0: skipped. More than a finished run's: it trains on "
                        "from its last checkpoint")
    p.add_argument("--default_style", choices=sorted(STYLES.values()), default="Noto",
                   help="the style unstyled prompts mean after restyle-teacher (ldm.data.emoji --default_style)")
    p.add_argument("--teacher_batch_size", type=int, default=64)
    p.add_argument("--teacher_lr", type=float, default=3e-4)
    p.add_argument("--unet_channels", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--dit_size", nargs=3, type=int, default=[256, 10, 4], metavar=("WIDTH", "DEPTH", "HEADS"),
                   help="DiT width, depth, heads (patch 2); the default matches the U-Net's FLOPs per image")
    p.add_argument("--distill_teacher_steps", type=int, default=16, choices=[8, 16, 32, 64],
                   help="the guided teacher's steps the first halving round starts from (halved down to 4)")
    p.add_argument("--guidance_steps", type=int, default=4800,
                   help="steps of the guidance-folding stage (the shipped student's 4800; the previous student's "
                        "2400 left it as far behind its own teacher)")
    p.add_argument("--distill_steps", type=int, default=ROUND_STEPS, help="steps of each halving round")
    p.add_argument("--distill_batch_size", type=int, default=32, help="batch of the fold and of each round")
    p.add_argument("--guidance_range", type=float, nargs=2, default=[1.0, 8.0], metavar=("LOW", "HIGH"),
                   help="guidance scales the fold trains on (the shipped student: 1 to 8, so guidance_scale stays "
                        "adjustable; LOW = HIGH folds one scale only)")
    p.add_argument("--student_guidance_scale", type=float, default=2.0,
                   help="the student's default guidance (its scheduler's guidance_scale), at which ship-student "
                        "evaluates it; the teacher stays at --guidance_scale. A folded student guides harder than its "
                        "input says: the shipped one scores best at 2, the teacher alike at 2 and 4")
    p.add_argument("--round_balance_by", default="hexcode", metavar="COLUMN",
                   help="the halving rounds draw every value of this column equally often (distill.py --balance_by; "
                        "'none': rows as the data has them). The fold draws rows as the data has them: it kept the "
                        "teacher's retrieval, and the unbalanced rounds lost the natural prompts' everyday concepts")
    p.add_argument("--eval_seeds", type=int, default=3,
                   help="seeds the student and its teacher are compared over (evaluate.py --num_seeds): one seed's "
                        "96 prompts resolve top-5 retrieval to about +-5 points, three to about +-3")
    p.add_argument("--distill_from", default=None,
                   help="the teacher pipeline the student stage distils (default: the chosen teacher in --work_dir; "
                        "e.g. models/emoji when that folder is gone)")
    add_recipe_arguments(p, "auto")
    return p.parse_args(argv)


PLACE_FLAGS = ("work_dir", "output_dir", "stages", "npm_cache", "refine_from", "distill_from")


def reproduce_command(args) -> str:
    """The one command that reproduces what ``args`` ships: this script with every recipe flag ``args`` sets away from
    its default (where files live, which stages run and where a shortcut teacher comes from are left out)."""
    defaults = vars(parse_args([]))
    words = ["python training/make_emoji_model.py"]
    for name, value in vars(args).items():
        if name in PLACE_FLAGS or value == defaults.get(name):
            continue
        shown = value if isinstance(value, (list, tuple)) else [value]
        words.append(" ".join([f"--{name}", *(f"{v:g}" if isinstance(v, float) else str(v) for v in shown)]))
    return " ".join(words)


def stage_data(args, work: Path) -> None:
    """The imagefolder in ``work/data``; with ``--restyle_steps`` also its ``--default_style`` copy."""
    cache = ["--cache_dir", args.npm_cache] if args.npm_cache else []
    if not (work / "data" / "train" / "metadata.jsonl").is_file():
        run("ldm.data.emoji", "--out", work / "data", *cache)
    restyled = restyle_data(args, work)
    if restyled != work / "data" and not (restyled / "train" / "metadata.jsonl").is_file():
        run("ldm.data.emoji", "--out", restyled, "--default_style", args.default_style, *cache)


def restyle_data(args, work: Path) -> Path:
    """The data the restyle-teacher stage and then the student train on (``work/data`` without that stage)."""
    return work / f"data{style_suffix(args.default_style)}" if args.restyle_steps > 0 else work / "data"


def stage_clip(args, work: Path) -> None:
    if not (work / "clip" / "text_encoder" / "config.json").is_file():
        run("train_clip.py", "--train_data_dir", work / "data", "--output_dir", work / "clip", "--max_train_steps",
            args.clip_steps, "--train_batch_size", 128, "--checkpointing_steps", 250, "--resume_from_checkpoint",
            "latest", "--mixed_precision", args.mixed_precision, "--seed", args.seed)


def stage_vae(args, work: Path) -> None:
    if not (work / "vae" / "config.json").is_file():
        run("train_vae.py", "--train_data_dir", work / "data", "--output_dir", work / "vae", "--resolution", 64,
            "--block_out_channels", *args.vae_channels, "--norm_num_groups", 8, "--train_batch_size", 24,
            "--max_train_steps", args.vae_steps, "--learning_rate", "1e-3", "--lr_warmup_steps", 100, "--random_flip",
            "--checkpointing_steps", 250, "--resume_from_checkpoint", "latest", "--mixed_precision",
            args.mixed_precision, "--seed", args.seed)


def denoiser_config(args, work: Path, kind: str) -> Path:
    config = {"unet": {"block_out_channels": args.unet_channels, "attention_levels": [False, True, True],
                       "layers_per_block": 2, "attention_head_dim": 32, "norm_num_groups": 32},
              "dit": {"patch_size": 2, "hidden_size": args.dit_size[0], "depth": args.dit_size[1],
                      "num_attention_heads": args.dit_size[2]}}[kind]
    path = work / f"teacher_{kind}.json"
    path.write_text(json.dumps(config))
    return path


def t2i_recipe(args, work: Path, out: Path, resume, data: Path | None = None) -> list:
    """The ``train_t2i.py`` flags every teacher run shares: data (``work/data`` unless given), objective, caption
    dropout, batch, precision."""
    return ["--train_data_dir", data or work / "data", "--resolution", 64, "--cache_latents", "--prediction_type",
            "v_prediction", "--rescale_betas_zero_snr", "--caption_dropout", "0.1", "--use_ema", "--train_batch_size",
            args.teacher_batch_size, "--lr_scheduler", "cosine", "--checkpoints_total_limit", 2,
            "--resume_from_checkpoint", resume, "--mixed_precision", args.mixed_precision, "--validation_prompts",
            *VALIDATION_PROMPTS, "--validation_guidance_scale", args.guidance_scale, "--output_dir", out, "--seed",
            args.seed]


def teacher_command(args, work: Path, kind: str, out: Path, steps: int, resume) -> list:
    return ["train_t2i.py", "--vae", work / "vae", "--text_encoder", work / "clip" / "text_encoder", "--tokenizer",
            work / "clip" / "tokenizer", "--denoiser", kind, "--denoiser_config", denoiser_config(args, work, kind),
            *t2i_recipe(args, work, out, resume), "--ema_decay", "0.9995", "--learning_rate", args.teacher_lr,
            "--lr_warmup_steps", 500, "--max_train_steps", steps, "--checkpointing_steps", 250, "--validation_steps",
            2500]


def refine_command(args, work: Path, start: Path, out: Path, stage: str = "refine-teacher") -> list:
    """Fine-tune the pipeline ``start`` with timesteps drawn logit-normal around t = 500 (SNR about 0.02 to 0.2
    there under the zero-terminal-SNR schedule: the band where a sample commits to a layout), a fresh optimizer,
    ``--refine_steps``; ``balance-teacher``: ``--balance_steps`` drawing every value of ``--balance_by`` equally
    often; ``perturb-teacher``: the same for ``--perturb_steps`` with ``--input_perturbation``; ``restyle-teacher``:
    that for ``--restyle_steps`` on the ``--default_style`` data."""
    steps = getattr(args, f"{stage.removesuffix('-teacher')}_steps")
    balance, perturb = stage != "refine-teacher", stage in ("perturb-teacher", "restyle-teacher")
    data = restyle_data(args, work) if stage == "restyle-teacher" else None
    return ["train_t2i.py", "--pretrained_model_name_or_path", start, *t2i_recipe(args, work, out, "latest", data),
            "--ema_decay", "0.999", "--learning_rate", "1e-4", "--lr_warmup_steps", 100, "--max_train_steps",
            steps, "--checkpointing_steps", 200, "--weighting_scheme", "logit_normal", "--logit_mean", 0,
            "--logit_std", 1, "--validation_steps", 100000,
            *(["--balance_by", args.balance_by] if balance or perturb else []),
            *(["--input_perturbation", args.input_perturbation] if perturb else [])]


def stage_teacher(args, work: Path, kind: str) -> None:
    out = work / f"teacher-{kind}"
    if not (out / "model_index.json").is_file():
        run(*teacher_command(args, work, kind, out, args.teacher_steps, "latest"))


def long_teacher(args, work: Path, kind: str) -> Path:
    """The continued teacher's folder (the 4,000-step one when ``--long_teacher_steps`` asks for no more)."""
    return work / (f"teacher-{kind}-long" if args.long_teacher_steps > args.teacher_steps else f"teacher-{kind}")


def refined_teacher(args, work: Path, kind: str) -> Path:
    """The refine-teacher stage's folder (with ``--refine_steps 0``: the continued teacher's)."""
    return long_teacher(args, work, kind) if args.refine_steps <= 0 else work / f"teacher-{kind}-refine"


def balanced_teacher(args, work: Path, kind: str) -> Path:
    """The balance-teacher stage's folder (with ``--balance_steps 0``: the refined teacher's)."""
    refined = refined_teacher(args, work, kind)
    return refined if args.balance_steps <= 0 else work / f"{refined.name}-balanced"


def perturbed_teacher(args, work: Path, kind: str) -> Path:
    """The perturb-teacher stage's folder (with ``--perturb_steps 0``: the balanced teacher's)."""
    balanced = balanced_teacher(args, work, kind)
    return balanced if args.perturb_steps <= 0 else work / f"{balanced.name}-perturbed"


def shipped_teacher(args, work: Path, kind: str) -> Path:
    """The folder of the teacher that ships: the restyled one, else (``--restyle_steps 0``) the perturbed one."""
    perturbed = perturbed_teacher(args, work, kind)
    return perturbed if args.restyle_steps <= 0 else work / f"{perturbed.name}{style_suffix(args.default_style)}"


def start_or_given(args, folder: Path) -> Path:
    """``folder`` when it holds a finished pipeline, else ``--refine_from`` when given (the work folder's is gone)."""
    return Path(args.refine_from) if args.refine_from and not (folder / "model_index.json").is_file() else folder


def balance_start(args, work: Path, kind: str) -> Path:
    """The teacher the balance-teacher stage fine-tunes: the refined one in ``work``, else ``--refine_from``."""
    return start_or_given(args, refined_teacher(args, work, kind))


def perturb_start(args, work: Path, kind: str) -> Path:
    """The teacher the perturb-teacher stage fine-tunes: the balanced one in ``work``, else ``--refine_from``."""
    return start_or_given(args, balanced_teacher(args, work, kind))


def restyle_start(args, work: Path, kind: str) -> Path:
    """The teacher the restyle-teacher stage fine-tunes: the perturbed one in ``work``, else ``--refine_from``."""
    return start_or_given(args, perturbed_teacher(args, work, kind))


def refine_stage(args, work: Path, kind: str, stage: str) -> tuple[int, Path, Path]:
    """(steps, folder, start pipeline) of the ``refine-teacher``, ``balance-teacher``, ``perturb-teacher`` or
    ``restyle-teacher`` stage."""
    if stage == "restyle-teacher":
        return args.restyle_steps, shipped_teacher(args, work, kind), restyle_start(args, work, kind)
    if stage == "perturb-teacher":
        return args.perturb_steps, perturbed_teacher(args, work, kind), perturb_start(args, work, kind)
    if stage == "balance-teacher":
        return args.balance_steps, balanced_teacher(args, work, kind), balance_start(args, work, kind)
    return (args.refine_steps, refined_teacher(args, work, kind),
            Path(args.refine_from or long_teacher(args, work, kind)))


def stage_teacher_long(args, work: Path, kind: str) -> None:
    """The chosen teacher resumed from its last checkpoint and trained on to ``--long_teacher_steps`` (the cosine
    schedule restarts warm at the factor the longer run has at that step), then evaluated like both teachers."""
    out = long_teacher(args, work, kind)
    if out == work / f"teacher-{kind}":
        return
    if not (out / "model_index.json").is_file():
        start = f"{work}/teacher-{kind}/checkpoint-{args.teacher_steps}"
        resume = "latest" if list(out.glob("checkpoint-*")) else start
        run(*teacher_command(args, work, kind, out, args.long_teacher_steps, resume))
    evaluate_teacher(args, out, work / f"eval-{out.name}.json")


def stage_refine_teacher(args, work: Path, kind: str, stage: str = "refine-teacher") -> None:
    """The continued teacher (or ``--refine_from``) fine-tuned ``--refine_steps`` on mid-noise timesteps, then
    evaluated like the others; ``balance-teacher``: the refined one fine-tuned again ``--balance_steps`` with every
    value of ``--balance_by`` drawn equally often; ``perturb-teacher``: the balanced one ``--perturb_steps`` more
    with ``--input_perturbation`` as well; ``restyle-teacher``: the perturbed one ``--restyle_steps`` more on the
    ``--default_style`` data."""
    steps, out, start = refine_stage(args, work, kind, stage)
    if steps <= 0:
        return
    report = work / f"eval-{out.name}.json"
    if lengthen(out, steps, report):
        run(*refine_command(args, work, recorded_start(out, start), out, stage))
    evaluate_teacher(args, out, report)


def lengthen(out: Path, steps: int, report: Path) -> bool:
    """Whether the run in ``out`` needs training to reach ``steps``. A finished run with fewer steps is trained on in
    place from its last checkpoint, whose weights are its own final ones (the cosine schedule restarts warm at the
    factor the longer schedule has there, as continue-teacher's does): its pipeline marker goes, so a cut-off run
    resumes rather than ships; its evaluation is kept as ``eval-...-STEPS.json`` and ``legs.json`` lists the steps
    each lengthening started from."""
    if not (out / "model_index.json").is_file():
        record_cut(out, steps)
        return True
    done = json.loads((out / "training_args.json").read_text())["max_train_steps"]
    if done >= steps:
        return False
    if not (out / f"checkpoint-{done}").is_dir():
        raise ValueError(f"{out} trained {done} steps and has no checkpoint-{done} to go on to {steps} from: move "
                         "that folder aside to train it from the start.")
    print(f"{out}: {done} steps done, training on to {steps}", flush=True)
    (out / "legs.json").write_text(json.dumps([*recorded_legs(out), done]))  # the card says where it restarted
    if report.is_file():
        report.rename(report.with_name(f"{report.stem}-{done}.json"))
    (out / "model_index.json").unlink()
    return True


def record_cut(out: Path, steps: int) -> None:
    """A run in ``out`` cut off before it finished and now asked for another length resumes from its last checkpoint
    under the new length's schedule: ``legs.json`` records that as ``[step, the cut run's length]``, so the card
    names the schedule each part really ran under."""
    record = out / "training_args.json"
    planned = json.loads(record.read_text())["max_train_steps"] if record.is_file() else steps
    latest = latest_good_checkpoint(out) if planned != steps else None  # it hashes the checkpoint's files
    if latest is None:
        return
    leg, legs = [int(latest.name.removeprefix("checkpoint-")), planned], recorded_legs(out)
    if legs[-1:] != [leg]:  # a rerun that stopped before training began records it once
        print(f"{out}: the {planned}-step run stopped at step {leg[0]}, going on to {steps}", flush=True)
        (out / "legs.json").write_text(json.dumps([*legs, leg]))


def recorded_start(folder: Path, start: Path) -> Path:
    """The pipeline the run in ``folder`` was started from, else ``start``: a resumed or lengthened run goes on from
    its checkpoint, so its ``training_args.json`` (and the card) keeps naming the weights it really began with."""
    record = folder / "training_args.json"
    return Path(json.loads(record.read_text())["pretrained_model_name_or_path"]) if record.is_file() else start


def recorded_legs(folder: Path) -> list:
    """The steps each :func:`lengthen` of the run in ``folder`` started from (none for a run trained in one go), as
    ``[step, length]`` where the run before was cut off there (:func:`record_cut`)."""
    record = folder / "legs.json"
    return json.loads(record.read_text()) if record.is_file() else []


def scoring_clip(args, work: Path) -> Path:
    """The CLIP that scores the suite: the trained one in ``work``, else the shipped fp16 copy."""
    return work / "clip" if (work / "clip" / "config.json").is_file() else Path(args.output_dir) / "emoji-clip"


def evaluate_teacher(args, folder: Path, report: Path, work: Path | None = None, seeds: int = 1) -> dict:
    work = work or folder.parent
    if not report.is_file():
        run("evaluate.py", "--suite", "emoji", "--model", folder, "--clip", scoring_clip(args, work), "--data_dir",
            work / "data", "--num_prompts", args.eval_prompts, "--steps", 50, "--guidance_scale",
            args.guidance_scale, "--num_seeds", seeds, "--output", report.with_suffix(".png"))
    return json.loads(report.read_text())


def stage_evaluate_teachers(args, work: Path) -> str:
    """Both teachers on the emoji suite; returns the kind with the better held-out top-5 retrieval."""
    scores = {k: evaluate_teacher(args, work / f"teacher-{k}", work / f"eval-teacher-{k}.json")["heldout"]["top5"]
              for k in ("unet", "dit")}
    best = max(scores, key=scores.get)
    (work / "teacher-choice.json").write_text(json.dumps({"heldout_top5": scores, "chosen": best}, indent=2))
    return best


def fold_range(args) -> tuple[float, float]:
    """The guidance scales the fold trains on (``--guidance_range``), checked to hold ``--student_guidance_scale``
    (the scale the student samples with by default) and ``--guidance_scale`` (the teacher's, compared with)."""
    low, high = args.guidance_range
    for flag in ("student_guidance_scale", "guidance_scale"):
        if not low <= getattr(args, flag) <= high:
            raise ValueError(f"--guidance_range {low:g} {high:g} must hold --{flag} {getattr(args, flag):g}.")
    return low, high


def distill_dir(args, work: Path, rounds: bool = True) -> Path:
    """The student stage's folder, named by its fold length, guidance range (1 to 8 unnamed, as the first run was)
    round length (``ROUND_STEPS`` unnamed) and the rounds' balancing column (none unnamed): a longer
    ``--guidance_steps``, another range, ``--distill_steps`` or ``--round_balance_by`` is a new run.
    ``rounds=False``: the folder of the same fold with the default, unbalanced rounds (where the fold is made)."""
    low, high = fold_range(args)
    scales = "" if (low, high) == (1, 8) else f"-s{low:g}" if low == high else f"-s{low:g}-{high:g}"
    length = "" if not rounds or args.distill_steps == ROUND_STEPS else f"-r{args.distill_steps}"
    balance = f"-by-{args.round_balance_by}" if rounds and round_balance(args) else ""
    return work / f"distilled-fold-{args.guidance_steps}{scales}{length}{balance}"


def round_balance(args) -> str | None:
    """The column the halving rounds balance (``--round_balance_by``; None for 'none')."""
    return None if args.round_balance_by.lower() == "none" else args.round_balance_by


def recorded_digest(folder: Path) -> str | None:
    """The teacher digest a student folder's ``teacher.json`` records (None without one)."""
    record = folder / "teacher.json"
    return json.loads(record.read_text())["denoiser_sha256"] if record.is_file() else None


def reuse_fold(args, out: Path, digest: str) -> None:
    """Copy a finished guidance fold of the same length and range, from a folder of the teacher with ``digest``
    (:func:`bind_teacher`'s) that differs only in round length, into ``out``, so a run that only changes
    ``--distill_steps`` starts at the rounds (the fold is most of the time)."""
    fold = f"guided-{args.distill_teacher_steps}-steps"
    if (out / fold).exists():
        return
    base = distill_dir(args, out.parent, rounds=False)
    others = [*out.parent.glob(f"{base.name}-r*"), *out.parent.glob(f"{base.name}-by-*")]
    for source in [base / fold, *sorted(p / fold for p in others)]:
        same = recorded_digest(source.parent) == digest
        if source != out / fold and same and (source / "model_index.json").is_file():
            print(f"Reusing the finished fold {source} for {out}", flush=True)
            shutil.copytree(source, out / fold)
            return


def distill_teacher(args, work: Path, kind: str) -> Path:
    """The pipeline the student stage distils: ``--distill_from``, else the chosen teacher in ``work``."""
    return Path(args.distill_from) if args.distill_from else shipped_teacher(args, work, kind)


def teacher_digest(teacher: Path) -> str:
    """sha256 over the teacher's denoiser weights: what ties a student folder to the teacher it distils."""
    files = sorted((Path(teacher) / "denoiser").glob("*.safetensors"))
    if not files:
        raise ValueError(f"{teacher} has no denoiser/*.safetensors: give --distill_from a LatentPipeline folder "
                         "(e.g. models/emoji).")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def bind_teacher(out: Path, teacher: Path) -> str:
    """Record the teacher of a student folder in ``out/teacher.json``, and refuse to resume (or ship) a folder that
    distils another teacher, e.g. after a new teacher was shipped as ``models/emoji``: the fold, the rounds and the
    teacher's evaluation kept there belong to the old one. A folder from before these records takes the teacher
    given now, with a note. Returns the teacher's digest."""
    record, digest, saved = out / "teacher.json", teacher_digest(teacher), recorded_digest(out)
    if saved is not None:
        if saved != digest:
            raise ValueError(
                f"{out} distils another teacher ({json.loads(record.read_text())['teacher']}, denoiser sha256 "
                f"{saved[:12]}) than {teacher} ({digest[:12]}): move that folder aside to distil {teacher} from the "
                "start, or give --distill_from the teacher it was made from.")
        return digest
    if out.is_dir() and any(out.iterdir()):
        print(f"{out} has no teacher record: taking it as a distillation of {teacher}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"teacher": str(teacher), "denoiser_sha256": digest}, indent=2))
    return digest


def distill_rounds(args) -> int:
    """Halving rounds from ``--distill_teacher_steps`` down to the 4-step student."""
    return (args.distill_teacher_steps // 4).bit_length() - 1


def distill_command(args, teacher: Path, out: Path, rounds: int, balance: str | None) -> list:
    """``distill.py`` for the fold and ``rounds`` halving rounds into ``out``, drawing ``balance`` equally often, on
    the data the teacher finished on (:func:`restyle_data`)."""
    low, high, work = *fold_range(args), out.parent
    return ["distill.py", "--teacher", teacher, "--teacher_steps", args.distill_teacher_steps, "--rounds", rounds,
            "--guidance_distillation", "--default_guidance_scale", args.student_guidance_scale,
            "--guidance_scale_min", low, "--guidance_scale_max", high, "--train_data_dir", restyle_data(args, work),
            "--cache_latents", "--guidance_steps", args.guidance_steps, "--guidance_learning_rate", "2e-4",
            "--steps_per_round", args.distill_steps, "--train_batch_size", args.distill_batch_size,
            "--learning_rate", "1e-4", *(["--balance_by", balance] if balance else []),
            "--use_ema", "--checkpointing_steps", 250, "--output_dir", out, "--seed", args.seed,
            "--mixed_precision", args.mixed_precision, "--validation_prompts", *VALIDATION_PROMPTS]


def stage_student(args, work: Path, kind: str) -> Path:
    """Guidance folded into the chosen teacher, then halving rounds from ``--distill_teacher_steps`` to 4 steps.
    With ``--round_balance_by`` the fold is made (or found) in the unbalanced folder and copied, and only the
    rounds draw balanced rows."""
    rounds, balance = distill_rounds(args), round_balance(args)
    out = distill_dir(args, work)
    student = out / f"round-{rounds}-4-steps"
    teacher = distill_teacher(args, work, kind)
    digest = bind_teacher(out, teacher)
    if not (student / "model_index.json").is_file():
        reuse_fold(args, out, digest)
        fold = f"guided-{args.distill_teacher_steps}-steps"
        if balance and not (out / fold / "model_index.json").is_file():
            base = distill_dir(args, work, rounds=False)
            bind_teacher(base, teacher)
            run(*distill_command(args, teacher, base, 0, None))  # the fold alone, rows as the data has them
            reuse_fold(args, out, digest)
        run(*distill_command(args, teacher, out, rounds, balance))
    return student

# ------------------------------------------------------------------------------------------------ shipping
LICENCE_NOTE = """Noto Emoji renders (`emoji-datasource-google@16.0.0`, Apache-2.0, Google), Twemoji
renders (`emoji-datasource-twitter@16.0.0`, CC-BY-4.0, "Twemoji by Twitter, Inc and other contributors"), captions
from CLDR labels and tags (`emojibase-data@17.0.0`, MIT), built by `python -m ldm.data.emoji`. The weights are a model
trained on Twemoji's CC-BY-4.0 images: this card gives the attribution CC-BY-4.0 asks for, and the weights are
released under the same licence."""
SETS_TEXT = {"train": "training concepts", "heldout": "held-out style x concept", "natural": "natural prompts"}


def ship_clip(work: Path, target: Path) -> None:
    """The project CLIP in float16 storage with its tokenizer and card (its text tower ships inside the
    pipelines, so it is not copied twice)."""
    import torch
    from transformers import CLIPModel

    from ldm.model_card import render_model_card

    clip = CLIPModel.from_pretrained(work / "clip", dtype=torch.float32)
    shutil.rmtree(target, ignore_errors=True)
    clip.half().save_pretrained(target)
    shutil.copytree(work / "clip" / "tokenizer", target / "tokenizer")
    train = json.loads((work / "eval-clip-train.json").read_text())
    held = json.loads((work / "eval-clip.json").read_text())
    concepts = json.loads((work / "data" / "dataset_info.json").read_text())["concepts"]
    notes = (f"Image -> concept retrieval over all {concepts:,} concepts (`python training/"
             f"evaluate.py --suite emoji --clip_only --clip {target} --data_dir work/emoji/data`), top-1 / top-5: "
             f"training renders {pct(train['top1'])} / {pct(train['top5'])} ({train['n']}), held-out Twemoji "
             "renders of "
             f"concepts seen only as Noto {pct(held['test']['top1'])} / {pct(held['test']['top5'])} "
             f"({held['test']['n']}), validation Noto renders {pct(held['validation']['top1'])} / "
             f"{pct(held['validation']['top5'])} ({held['validation']['n']}).\n\nData and licences: {LICENCE_NOTE}"
             "\n\nReproduce: "
             "`python training/make_emoji_model.py --stages data clip`.")
    hyper = {k: v for k, v in json.loads((work / "clip" / "training_args.json").read_text()).items()
             if v is not None and k not in ("output_dir", "cache_dir", "resume_from_checkpoint")}
    cfg = clip.config
    render_model_card(
        target, template="clip", repo_id=str(target), library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license="cc-by-4.0", tags=["clip", "emoji"], hyperparameters=hyper, notes=notes,
        description=f"A small CLIP (`CLIPModel`, {sum(p.numel() for p in clip.parameters()) / 1e6:.1f}M parameters: "
        f"text and vision towers {cfg.text_config.hidden_size} wide, {cfg.text_config.num_hidden_layers} layers, "
        f"vision patch {cfg.vision_config.patch_size} on {cfg.vision_config.image_size} px; a CLIP-format BPE "
        "tokenizer trained on the captions) trained from scratch by ldm (`training/train_clip.py`) on the training "
        "pairs of the emoji data. Its text tower is the frozen text encoder of `models/emoji` and "
        "`models/emoji-student`; the whole CLIP scores their evaluation (`training/evaluate.py --suite emoji`). "
        "Stored in float16.")


def pct(x) -> str:
    return f"{100 * x:.1f} %"


def teacher_figures(work: Path, folder: str, base: dict | None = None, stage: str | None = None) -> dict:
    """Parameters, training FLOPs (forward + backward per image x images seen), wall time and evaluation of the
    teacher in ``work/folder``; a continued or refined teacher's steps, FLOPs and time include those of the ``base``
    row it started from (for ``-long``: the stage timings of its 4,000-step run); a refined one's own time is its
    ``stage``'s. The row names the row it was made from (``from``: the base; for ``-long``, the first teacher)."""
    import ldm
    from ldm.flops import denoiser_training_flops

    index = json.loads((work / folder / "model_index.json").read_text())
    denoiser = getattr(ldm, index["denoiser"][1]).from_pretrained(work / folder / "denoiser")
    trained = json.loads((work / folder / "training_args.json").read_text())
    per_image = denoiser_training_flops(denoiser)
    timings = json.loads((work / "timings.json").read_text())
    kind = folder.split("-")[1]
    steps, minutes = trained["max_train_steps"], timings.get(f"teacher-{kind}")
    if folder.endswith("-long") and minutes is not None:
        minutes += timings.get("continue-teacher", 0)
    pflop = per_image * steps * trained["train_batch_size"] / 1e15
    if base is not None:
        own = timings.get(stage)
        steps, pflop = steps + base["steps"], pflop + base["pflop"]
        minutes = base["minutes"] + own if base["minutes"] and own else None
    made_from = base["name"] if base is not None else kind if folder.endswith("-long") else None
    return {"kind": kind, "name": folder.removeprefix("teacher-"), "from": made_from, "class": type(denoiser).__name__,
            "params": sum(p.numel() for p in denoiser.parameters()), "gflop_per_image": per_image / 1e9,
            "pflop": pflop, "steps": steps, "minutes": minutes,
            "eval": json.loads((work / f"eval-{folder}.json").read_text())}


def refine_base(rows: dict, own: str, start: Path) -> dict | None:
    """The row a refined teacher (named ``own``) started from, the pipeline ``start``: a work folder is its own row;
    a shipped one is the row its ``teachers.json`` ships (``shipped``), unless that row is ``own`` or was made from it
    (re-shipping ``own``): then the row the record says ``own`` was made from (each row's ``from``)."""
    if not (start / "teachers.json").is_file():
        return rows.get(start.name.removeprefix("teacher-"))
    saved = json.loads((start / "teachers.json").read_text())
    made_from = {r["name"]: r.get("from") for r in saved["rows"]}
    name, seen = saved.get("shipped"), set()
    while name is not None and name != own and name not in seen:  # up the chain the shipped row was made along
        seen.add(name)
        name = made_from.get(name)
    name = made_from.get(own) if name == own else saved.get("shipped")
    if name is None:
        raise ValueError(f"{start / 'teachers.json'} names no row that {own} can start from: it needs 'shipped' (and "
                         f"'from' on the row {own!r} when it ships {own} or a teacher made from it); re-ship the "
                         "teacher with --stages ship-teacher, or refine from a work folder")
    return rows.get(name)


def teacher_rows(args, work: Path, kind: str, saved: list[dict]) -> list[dict]:
    """The teachers' table, oldest first: every teacher folder in ``work`` measured; those no longer there taken
    from ``saved`` (the ``teachers.json`` the last ``ship-teacher`` wrote beside the shipped model)."""
    rows = {r["name"]: r for r in saved}
    long, balanced = long_teacher(args, work, kind), f"{refined_teacher(args, work, kind).name}-balanced"
    starts = {f"teacher-{kind}-refine": (Path(args.refine_from) if args.refine_from else long, "refine-teacher"),
              balanced: (balance_start(args, work, kind), "balance-teacher"),
              f"{balanced_teacher(args, work, kind).name}-perturbed": (perturb_start(args, work, kind),
                                                                        "perturb-teacher")}
    if args.restyle_steps > 0:
        starts[shipped_teacher(args, work, kind).name] = (restyle_start(args, work, kind), "restyle-teacher")
    for folder in dict.fromkeys(("teacher-unet", "teacher-dit", long.name, f"teacher-{kind}-refine", *starts)):
        if (work / folder / "model_index.json").is_file():
            name = folder.removeprefix("teacher-")
            start, stage = starts.get(folder, (None, None))
            rows[name] = teacher_figures(work, folder, start and refine_base(rows, name, start), stage)
    return list(rows.values())


def teachers_table(rows: list[dict], chosen: str) -> str:
    head = ("| teacher | parameters | steps of 64 | training GFLOP / image | training PFLOP | wall time | "
            "train top-1 / top-5 | held-out top-1 / top-5 | natural top-1 / top-5 | "
            "CLIP score ratio (train / held-out / natural) | Fréchet CLIP distance (train) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        e = r["eval"]
        sets = " | ".join(f"{pct(e[k]['top1'])} / {pct(e[k]['top5'])}" for k in SETS_TEXT)
        ratio = " / ".join(f"{e[k]['clip_score_ratio']:.2f}" for k in SETS_TEXT)
        name = f"**{r['name']}** (shipped)" if r["name"] == chosen else r["name"]
        minutes = f"{r['minutes']:.0f} min" if r["minutes"] else "?"
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['steps']} | {r['gflop_per_image']:.2f} | "
                     f"{r['pflop']:.2f} | {minutes} | {sets} | {ratio} | {e['train']['frechet_clip_distance']:.3f} |")
    return head + "\n".join(lines)


def group_table(report: dict) -> str:
    groups = sorted(report["heldout"]["by_group"])
    head = "| set | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups) + "\n"
    return head + "\n".join(
        f"| {SETS_TEXT[k]} | " + " | ".join(pct(report[k]["by_group"][g]["top5"]) if g in report[k]["by_group"]
                                            else "-" for g in groups) + " |" for k in ("train", "heldout"))


def stage_ship_teacher(args, work: Path, kind: str) -> None:
    """The chosen teacher as ``models/emoji`` (float16 storage, trailing DDIM) and the CLIP as ``models/emoji-clip``,
    with cards: both teachers' table, the evaluation by set and group, data, licences and the reproduce command."""
    from ldm.model_card import render_model_card
    from ldm.recipes import ship_pipeline

    out = Path(args.output_dir)
    target, shipped = out / "emoji", shipped_teacher(args, work, kind)
    record = json.loads((target / "teachers.json").read_text()) if (target / "teachers.json").is_file() else {}
    rows = teacher_rows(args, work, kind, record.get("rows", []))
    teacher_stages = STAGES[:STAGES.index("ship-teacher") + 1]
    timings = {**record.get("timings", {}), **{k: v for k, v in json.loads((work / "timings.json").read_text()).items()
                                               if k in teacher_stages}}
    ship_pipeline(shipped, target, trailing_ddim=True, half=("denoiser", "vae", "text_encoder"))
    if (work / "clip" / "config.json").is_file():
        ship_clip(work, out / "emoji-clip")
    else:
        print(f"{work}/clip is gone: {out}/emoji-clip stays as shipped", flush=True)
    shutil.copy(work / f"eval-{shipped.name}-natural.png", target / "samples.png")
    chosen = next(r for r in rows if r["name"] == shipped.name.removeprefix("teacher-"))
    brief = [dict(r, eval={k: {m: v for m, v in e.items() if m != "per_prompt"} if isinstance(e, dict) else e
                           for k, e in r["eval"].items()}) for r in rows]
    notes = later_notes(shipped, record.get("notes"))
    (target / "teachers.json").write_text(json.dumps({"rows": brief, "shipped": chosen["name"], "timings": timings,
                                                      "notes": notes}, indent=1))
    trained = json.loads((shipped / "training_args.json").read_text())
    hyper = {k: v for k, v in trained.items() if v is not None and k not in
             ("output_dir", "cache_dir", "resume_from_checkpoint", "validation_prompts", "hub_token", "license",
              "push_to_hub", "report_to", "logging_dir", "dataloader_num_workers")}
    render_model_card(
        target, repo_id=str(target), license="cc-by-4.0", tags=["emoji"], hyperparameters=hyper,
        denoiser_class=chosen["class"], num_parameters=f"{chosen['params'] / 1e6:.1f}M",
        scheduler_class="DDIMScheduler (trailing)", prediction_type=trained["prediction_type"],
        beta_schedule=trained["beta_schedule"], zero_snr=True, example_prompt="a red fox",
        validation_image="samples.png", validation_prompts=", ".join(NATURAL_PROMPTS),
        notes=teacher_notes(args, work, rows, chosen, shipped, timings, "".join(notes.values())),
    )


def refine_note(args) -> str:
    if args.refine_steps <= 0:
        return ""
    return f"""
Then `--stages refine-teacher` fine-tuned it {args.refine_steps} steps more (fresh AdamW, learning rate 1e-4 with a
100-step warm-up and cosine decay, EMA 0.999) with the training timesteps drawn logit-normal around t = 500
(`--weighting_scheme logit_normal`, mean 0, std 1) instead of uniformly: the noise band (SNR about 0.02 to 0.2) where a
sample from pure noise commits to its layout, which `training/inspect_denoiser.py` showed the continued teacher
losing (the README's "Where the shapes are lost")."""


def legs_text(folder: Path, flag: str) -> tuple[dict, str, str]:
    """The run in ``folder``: its training arguments, where it restarted warm, and its lengths as ``flag`` values."""
    trained = json.loads((folder / "training_args.json").read_text())
    legs = [(leg, leg) if isinstance(leg, int) else tuple(leg) for leg in recorded_legs(folder)]  # (step, length)
    steps = [f"step-{n}" for n, _ in legs]
    restart = "" if not legs else (
        f" (trained on from its {steps[0]} checkpoint, the cosine schedule restarting warm)" if len(legs) == 1 else
        f" (trained on from its {', '.join(steps[:-1])} and {steps[-1]} checkpoints in turn, the cosine schedule "
        "restarting warm each time)")
    runs = [f"`{flag} {length}`" + (f" stopped at step {n}" if length != n else "") for n, length in legs]
    return trained, restart, ", then ".join([*runs, f"`{flag} {trained['max_train_steps']}`"])


def balance_note(shipped: Path, recorded: dict | None = None) -> str:
    """The card's account of the balance-teacher stage, naming the pipeline it started from (for a perturbed
    teacher: the balanced one's; when that folder is gone, the account ``recorded`` in the shipped ``teachers.json``
    when the balanced teacher shipped, else one line)."""
    perturbed, shipped = shipped.name.endswith("-perturbed"), shipped.with_name(shipped.name.removesuffix("-perturbed"))
    if not shipped.name.endswith("-balanced"):
        return ""
    if perturbed and not (shipped / "training_args.json").is_file():  # trained from the shipped balanced teacher
        return (recorded or {}).get("balance-teacher") or (
            "\nThen `--stages balance-teacher` ran that refinement again, drawing every value of "
            "`--balance_by` equally often.")
    trained, restart, runs = legs_text(shipped, "--balance_steps")
    return f"""
Then `--stages balance-teacher` ran that refinement again, {trained["max_train_steps"]} steps{restart} from
`{trained["pretrained_model_name_or_path"]}` (the row above), drawing every value of the data's
`{trained["balance_by"]}` column equally often ({runs}, `--balance_by`; with replacement, seeded per
epoch): with `hexcode` each concept as often as any other, however many renders (styles, skin tones) it has; people
are 59 % of the renders but 20 % of the concepts."""


def perturb_note(shipped: Path) -> str:
    """The card's account of the perturb-teacher stage (empty for another teacher)."""
    if not shipped.name.endswith("-perturbed"):
        return ""
    trained, restart, runs = legs_text(shipped, "--perturb_steps")
    return f"""
Then `--stages perturb-teacher` trained it on with the same recipe, {trained["max_train_steps"]} steps{restart} from
`{trained["pretrained_model_name_or_path"]}` (the row above; {runs}), with its input perturbed (`--input_perturbation
{trained["input_perturbation"]}`, DDPM-IP, Ning et al. 2023: the input is noised with eps + gamma * xi, xi a second
draw, while the target stays eps, so training meets inputs a little off the forward process, as a sampler's are)."""


def restyle_note(shipped: Path) -> str:
    """The card's account of the restyle-teacher stage (empty for another teacher)."""
    if unstyled(shipped) == shipped:
        return ""
    trained, restart, runs = legs_text(shipped, "--restyle_steps")
    style = restyled_style(shipped)
    other = next(s for s in STYLES.values() if s != style)
    return f"""
Then `--stages restyle-teacher` trained it on with the same recipe, {trained["max_train_steps"]} steps{restart} from
`{trained["pretrained_model_name_or_path"]}` (the row above; {runs}), on `{trained["train_data_dir"]}`: the data
built with `--default_style {style}`, where every {other} training caption names its style ("a fox, {other}
style"), so that a prompt without a style word means {style} alone rather than a blend of both styles' renders
(the test and validation captions, and so the evaluation, are the same as before)."""


def style_suffix(style: str) -> str:
    """The ``-STYLE-default`` suffix of the folders made for ``--default_style STYLE`` (data, restyled teacher)."""
    return f"-{style.lower()}-default"


def restyled_style(folder: Path) -> str | None:
    """The default style whose :func:`style_suffix` ends ``folder``'s name (None without one)."""
    return next((s for s in STYLES.values() if folder.name.endswith(style_suffix(s))), None)


def unstyled(folder: Path) -> Path:
    """``folder`` without the restyle-teacher stage's ``-STYLE-default`` suffix (``folder`` itself without one)."""
    style = restyled_style(folder)
    return folder.with_name(folder.name.removesuffix(style_suffix(style))) if style else folder


def later_notes(shipped: Path, recorded: dict | None = None) -> dict:
    """The card's accounts of the balance-, perturb- and restyle-teacher stages that made ``shipped``, by stage
    (none for none); ``recorded``: those the shipped ``teachers.json`` kept, for a stage whose work folder is gone."""
    notes = {"balance-teacher": balance_note(unstyled(shipped), recorded),
             "perturb-teacher": perturb_note(unstyled(shipped)), "restyle-teacher": restyle_note(shipped)}
    return {stage: text for stage, text in notes.items() if text}


def teacher_notes(args, work: Path, rows: list[dict], chosen: dict, shipped: Path, timings: dict,
                  later: str) -> str:
    """The emoji sections of the teacher's card (the ``notes`` of ``model_cards/text_to_image.md``); ``later``: the
    balance-, perturb- and restyle-teacher stages' accounts (``later_notes``)."""
    report = chosen["eval"]
    steps, scale = report["steps"], report["guidance_scale"]
    sets = "\n".join(
        f"| {SETS_TEXT[k]} | {report[k]['n']} | {pct(report[k]['top1'])} | {pct(report[k]['top5'])} | "
        f"{pct(report[k]['real_top5'])} | {report[k]['clip_score']:.3f} / {report[k]['real_clip_score']:.3f} = "
        f"{report[k]['clip_score_ratio']:.2f} | {report[k]['frechet_clip_distance']:.3f} |" for k in SETS_TEXT)
    times = ", ".join(f"{s} {timings[s]:.0f} min" if timings[s] >= 0.5 else f"{s} <1 min" for s in STAGES
                      if s in timings)
    return f"""The samples above are the 30 natural prompts of the evaluation (one image each, seed = prompt index,
{steps} DDIM steps, guidance {scale}).

### U-Net vs DiT at about the same training FLOPs

Both trained by `training/make_emoji_model.py` on the same data, steps, batch and recipe (v-prediction, zero-terminal
SNR, cached latents, a caption drawn per step from each image's list, 10 % caption dropout, EMA 0.9995, bf16
autocast), side by side on one core each of a 2-core CPU (wall times are shared-CPU times). FLOPs are counted with
`torch.utils.flop_counter` (`ldm.flops.denoiser_training_flops`: forward and backward of one 16 x 16 x 4 latent with
77 caption tokens) times the images seen. Evaluation: `training/evaluate.py --suite emoji` ({steps} DDIM steps,
guidance {scale}), retrieval over all concepts with the project CLIP (`models/emoji-clip`).

{teachers_table(rows, chosen["name"])}

The better teacher by held-out top-5 retrieval ({chosen["kind"]}) was then trained on from its step-{args.teacher_steps}
checkpoint to {args.long_teacher_steps} steps (`--stages continue-teacher`, `--long_teacher_steps`: the cosine schedule
of the longer run restarts warm at that step) and evaluated the same way.{refine_note(args)}{later}
The row marked "shipped" is this model. The comparison of the two architectures is the pair of
{args.teacher_steps}-step rows.

### Evaluation of the shipped teacher

Retrieval: is the prompted concept the top-1 / in the top-5 of all concepts by CLIP image-text similarity; "real"
is the same for the real render of the prompted concept (the CLIP's own ceiling). CLIP score: generated against real
renders of the same prompts. The Fréchet distance is computed in the project CLIP's image-embedding space between the
generated images and the real renders: an in-domain distance, not Inception FID.

| set | prompts | top-1 | top-5 | real top-5 | CLIP score (generated / real = ratio) | Fréchet CLIP distance |
|---|---|---|---|---|---|---|
{sets}

Top-5 retrieval by emoji group:

{group_table(report)}

Command (on the trained folder; `models/emoji` is its float16-stored copy): `python training/evaluate.py --suite
emoji --model {shipped} --clip {scoring_clip(args, work)} --data_dir {work}/data --num_prompts {args.eval_prompts}
--steps {steps} --guidance_scale {scale}`.

### Data and licences

{LICENCE_NOTE}

### Reproduce

`{reproduce_command(args)}` (stage by stage, resumable; wall time on the 2-core CPU of this project's
machines: {times}).
"""


def student_row(name: str, report: dict, key: str) -> str:
    """A row of the student card's table: pooled over the seeds (when the report has them) and the first seed."""
    first = report[key]
    pooled = report.get("pooled", {}).get(key, first)
    return (f"| {name} | {SETS_TEXT[key]} | {pooled['n']} | {pct(pooled['top1'])} / {pct(pooled['top5'])} | "
            f"{pct(first['top1'])} / {pct(first['top5'])} | {first['clip_score_ratio']:.2f} | "
            f"{first['frechet_clip_distance']:.3f} | {pooled['seconds_per_image']:.3f} |")


def set_student_guidance(folder: Path, scale: float) -> float:
    """Make ``scale`` the default guidance of the student pipeline in ``folder`` (its scheduler's ``guidance_scale``,
    which the pipeline reads when ``guidance_scale`` is not given); returns the one it was distilled with."""
    from ldm import ProgressiveDistillationScheduler

    scheduler = ProgressiveDistillationScheduler.from_pretrained(folder, subfolder="scheduler")
    trained = scheduler.config.guidance_scale
    scheduler.register_to_config(guidance_scale=scale)
    scheduler.save_pretrained(folder / "scheduler")
    return trained


def teacher_report(args, work: Path, out: Path, source: Path, digest: str) -> dict:
    """The teacher's evaluation over ``--eval_seeds`` in the student folder ``out``: copied from the folder its fold
    was made in (the unbalanced rounds' one) when that folder distils the same teacher (``digest``), else run."""
    seeds = f"-seeds{args.eval_seeds}" if args.eval_seeds > 1 else ""
    report = out / f"eval-teacher{seeds}.json"
    made = distill_dir(args, work, rounds=False) / report.name
    if not report.is_file() and made.is_file() and recorded_digest(made.parent) == digest:
        shutil.copy(made, report)
    return evaluate_teacher(args, source, report, work, args.eval_seeds)


def stage_ship_student(args, work: Path, kind: str) -> None:
    """The 4-step student on the emoji suite, shipped as ``models/emoji-student`` (float16 storage) with its card
    (distill.py's, licensed as its data requires, plus the student-vs-teacher table)."""
    from ldm.recipes import share_components, ship_pipeline

    out, source = distill_dir(args, work), distill_teacher(args, work, kind)
    digest = bind_teacher(out, source)
    scale = args.student_guidance_scale
    student = out / f"round-{distill_rounds(args)}-4-steps"
    report = out / ("eval-student.json" if scale == 4 else f"eval-student-g{scale:g}.json")  # 4: the first ones'
    if not report.is_file():
        run("evaluate.py", "--suite", "emoji", "--model", student, "--clip", scoring_clip(args, work), "--data_dir",
            work / "data", "--num_prompts", args.eval_prompts, "--guidance_scale", scale,
            "--num_seeds", args.eval_seeds, "--output", report.with_suffix(".png"))
    target = Path(args.output_dir) / "emoji-student"
    ship_pipeline(student, target, trailing_ddim=False, half=("denoiser", "vae", "text_encoder"))
    trained_scale = set_student_guidance(target, scale)
    shared = share_components(target, Path(args.output_dir) / "emoji")
    shutil.copy(report.with_name(f"{report.stem}-natural.png"), target / "samples.png")
    ours = json.loads(report.read_text())
    teacher = teacher_report(args, work, out, source, digest)
    rows = "\n".join(student_row(name, r, k) for k in SETS_TEXT
                      for name, r in ((f"student, 4 steps, guidance {scale:g}", ours),
                                      (f"teacher ({kind or source.name}), 50 steps, guidance {args.guidance_scale:g}",
                                       teacher)))
    balance = round_balance(args)
    draws = f"the halving rounds drew every `{balance}` equally often" if balance else "so did the halving rounds"
    card = (target / "README.md").read_text().replace("license: apache-2.0", "license: cc-by-4.0").replace(
        f"(default {trained_scale})", f"(default {scale:g}; distilled with default {trained_scale:g})").replace(
        '"a red circle on a blue background"', '"a red fox"')
    (target / "README.md").write_text(card.rstrip() + f"""

## Evaluation on the emoji suite

The 30 natural prompts: `samples.png` (one image each, seed = prompt index). Retrieval over all concepts with the
project CLIP (`models/emoji-clip`), the student at its default guidance {scale:g}, the teacher at
{args.guidance_scale:g} (`--student_guidance_scale`, `--guidance_scale`); `training/evaluate.py --suite emoji
--model {student} --clip {scoring_clip(args, work)} --data_dir {work}/data --num_prompts {args.eval_prompts}
--guidance_scale {scale:g} --num_seeds {args.eval_seeds}`. Top-1 / top-5 over all {args.eval_seeds} seed(s) (each
seed draws its own prompts and noise; one seed's {args.eval_prompts} prompts resolve top-5 to about +-5 points) and
for the first seed alone, whose images the grid shows and whose CLIP score ratio and Fréchet distance the table
gives:

| model | set | prompts | top-1 / top-5, all seeds | top-1 / top-5, first seed | CLIP score ratio | Fréchet CLIP distance | s / image |
|---|---|---|---|---|---|---|---|
{rows}

## Data and licences

{LICENCE_NOTE}

The guidance fold drew the training rows as the data has them; {draws}
(`--round_balance_by`).

Reproduce: `{reproduce_command(args)}` (the teacher is `models/emoji`).

The components {", ".join(f"`{c}`" for c in shared) or "(none)"} are the teacher's files: in this folder they are
symlinks to `../emoji/`, so the bundle stores them once (`save_pretrained` or `push_to_hub` of the loaded pipeline
writes full copies).
""")


class StageClock:
    """Adds a stage's wall time to ``timings.json`` every minute while it runs (a run killed at a session's end
    keeps the minutes it spent; the file is re-read each time, so stages run side by side all keep theirs)."""

    def __init__(self, file: Path, stage: str):
        self.file, self.stage, self.done = file, stage, threading.Event()

    def add(self, minutes: float) -> None:
        timings = json.loads(self.file.read_text()) if self.file.is_file() else {}
        timings[self.stage] = round(timings.get(self.stage, 0) + minutes, 2)
        self.file.write_text(json.dumps(timings, indent=2))

    def __enter__(self):
        self.start = time.perf_counter()
        threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self) -> None:
        while not self.done.wait(60):
            self.add(1.0)
            self.start += 60

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.add((time.perf_counter() - self.start) / 60)


def chosen_kind(choice: Path, given: str | None = None) -> str:
    """The teacher kind the evaluate-teachers stage chose; without its record, the kind of the denoiser in the
    ``given`` pipeline (``--refine_from``), so a work folder whose teachers are gone can still refine and ship."""
    if choice.is_file():
        return json.loads(choice.read_text())["chosen"]
    if given and (Path(given) / "model_index.json").is_file():
        denoiser = json.loads((Path(given) / "model_index.json").read_text())["denoiser"][1]
        kinds = {"UNetModel": "unet", "DiTModel": "dit"}
        if denoiser not in kinds:
            raise ValueError(f"{given} has a {denoiser} denoiser; the emoji recipe trains UNetModel or DiTModel.")
        return kinds[denoiser]
    raise ValueError(f"{choice} is missing: run --stages evaluate-teachers first (it picks the teacher), or give "
                     "--distill_from with a teacher pipeline (e.g. models/emoji) for the student stages, "
                     "--refine_from for refine-teacher and ship-teacher.")


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    choice = work / "teacher-choice.json"
    kind = None
    for stage in args.stages:
        with StageClock(work / "timings.json", stage):
            if stage == "data":
                stage_data(args, work)
            elif stage == "clip":
                stage_clip(args, work)
            elif stage == "vae":
                stage_vae(args, work)
            elif stage.startswith("teacher-"):
                stage_teacher(args, work, stage.split("-")[1])
            elif stage == "evaluate-teachers":
                kind = stage_evaluate_teachers(args, work)
            elif stage == "continue-teacher":
                stage_teacher_long(args, work, kind or chosen_kind(choice))
            elif stage in ("refine-teacher", "balance-teacher", "perturb-teacher", "restyle-teacher"):
                stage_refine_teacher(args, work, kind or chosen_kind(choice, args.refine_from), stage)
            elif stage == "ship-teacher":
                stage_ship_teacher(args, work, kind or chosen_kind(choice, args.refine_from))
            elif stage == "student":
                stage_student(args, work, None if args.distill_from else kind or chosen_kind(choice))
            elif stage == "ship-student":
                stage_ship_student(args, work, None if args.distill_from else kind or chosen_kind(choice))


if __name__ == "__main__":
    main(parse_args())
