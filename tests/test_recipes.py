"""The recipes' shipping helpers (``ldm.recipes``): float16 storage that loads back as float32, and a student that
stores its teacher's identical components once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm.recipes import share_components, ship_pipeline
from ldm.tiny import tiny_pipeline
from pipelines import LatentPipeline


def _flags(cmd) -> dict:
    """A recipe command's ``--flag value`` pairs, as strings."""
    cmd = [str(c) for c in cmd]
    return {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("--")}


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_student_shares_its_teachers_identical_components_and_still_loads(tmp_path):
    teacher = tiny_pipeline("unet", seed=0)
    student = tiny_pipeline("unet", seed=0)
    student.denoiser = tiny_pipeline("unet", seed=1).denoiser     # only the denoiser differs
    for name, pipe in (("src-teacher", teacher), ("src-student", student)):
        pipe.save_pretrained(tmp_path / name)
        (tmp_path / name / "README.md").write_text(f'# {name}\n\nLatentPipeline.from_pretrained("{name}")\n')
    ship_pipeline(tmp_path / "src-teacher", tmp_path / "out" / "emoji", trailing_ddim=False)
    ship_pipeline(tmp_path / "src-student", tmp_path / "out" / "emoji-student", trailing_ddim=False)
    before = sample(LatentPipeline.from_pretrained(tmp_path / "out" / "emoji-student"))

    shared = share_components(tmp_path / "out" / "emoji-student", tmp_path / "out" / "emoji")

    assert shared == ["scheduler", "text_encoder", "tokenizer", "vae"]
    folder = tmp_path / "out" / "emoji-student"
    assert (folder / "vae").is_symlink() and not (folder / "denoiser").is_symlink()
    assert (folder / "vae").resolve() == (tmp_path / "out" / "emoji" / "vae").resolve()
    loaded = LatentPipeline.from_pretrained(folder)
    assert loaded.vae.dtype == torch.float32
    assert (sample(loaded) == before).all()
    assert share_components(folder, tmp_path / "out" / "emoji") == []     # a second call finds nothing more
    card = (folder / "README.md").read_text()
    assert card.startswith("# emoji-student") and f'from_pretrained("{folder}")' in card


def test_share_components_ignores_the_writing_library_version_but_not_the_config(tmp_path):
    """A student saved by a newer transformers or diffusers still shares its teacher's identical weights; a config
    that differs in anything else keeps its own folder."""
    import json

    pipe = tiny_pipeline("unet", seed=0)
    for name in ("emoji", "emoji-student"):
        pipe.save_pretrained(tmp_path / name)
    for component, key in (("text_encoder", "transformers_version"), ("vae", "_diffusers_version")):
        config = tmp_path / "emoji-student" / component / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), key: "99.0.0"}))
    config = tmp_path / "emoji-student" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 999}))
    shared = share_components(tmp_path / "emoji-student", tmp_path / "emoji")
    assert "text_encoder" in shared and "vae" in shared and "scheduler" not in shared


def test_share_components_refuses_folders_that_are_not_siblings(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "c" / "y").mkdir(parents=True)
    with pytest.raises(ValueError, match="same folder"):
        share_components(tmp_path / "a" / "x", tmp_path / "b" / "c" / "y")


def test_auto_mixed_precision_is_bf16_only_where_the_cpu_computes_bf16(caplog):
    """``--mixed_precision auto`` (the emoji recipe's default) picks bf16 only on a GPU or a CPU with native bf16: on
    an AVX2-only CPU bf16 autocast is emulated and about 12x slower than float32. The check agrees with the CPU's
    own flags, and asking for bf16 on such a CPU warns."""
    import logging

    from ldm.distributed import cpu_has_native_bf16, resolve_mixed_precision, warn_if_emulated_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text().split()
        assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    native = cpu_has_native_bf16()
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert [resolve_mixed_precision(c) for c in ("no", "bf16", "fp16", None)] == ["no", "bf16", "fp16", None]
    with caplog.at_level(logging.WARNING, logger="ldm.distributed"):
        assert warn_if_emulated_bf16("bf16", torch.device("cpu")) == (not native)
        assert not warn_if_emulated_bf16("no", torch.device("cpu"))
    assert ("emulated" in caplog.text) == (not native)


def test_emoji_recipe_student_flags_name_the_run_and_check_the_range(tmp_path):
    """The emoji recipe's student stage with unbalanced rounds: guidance 1 to 8, fold of 4,800 steps in
    ``distilled-fold-4800``; another fold length, range or round length is another folder, so it never resumes
    the wrong run, and a run that only changes the round length starts from the finished fold of the same teacher;
    a folder records its teacher and refuses another;
    a range that does not hold the sampling scale is refused."""

    from conftest import load_script

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")
    from ldm.distributed import resolve_mixed_precision

    args = recipe.parse_args(["--round_balance_by", "none"])
    assert args.mixed_precision == resolve_mixed_precision("auto")  # "auto" is resolved as it is parsed
    assert recipe.fold_range(args) == (1.0, 8.0) and recipe.distill_dir(args, tmp_path).name == "distilled-fold-4800"
    args = recipe.parse_args(["--guidance_range", "4", "4", "--student_guidance_scale", "4",
                              "--guidance_steps", "1200", "--round_balance_by", "none"])
    assert recipe.distill_dir(args, tmp_path).name == "distilled-fold-1200-s4"
    assert recipe.distill_dir(recipe.parse_args(["--guidance_range", "2", "6", "--round_balance_by", "none"]),
                              tmp_path).name == "distilled-fold-4800-s2-6"
    teacher, other = tmp_path / "teacher", tmp_path / "other-teacher"
    for folder, weights in ((teacher, b"old"), (other, b"new")):
        (folder / "denoiser").mkdir(parents=True)
        (folder / "denoiser" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    args = recipe.parse_args(["--distill_steps", "800", "--round_balance_by", "none"])  # the fold is copied
    out = recipe.distill_dir(args, tmp_path)
    assert out.name == "distilled-fold-4800-r800"
    recipe.reuse_fold(args, out, recipe.teacher_digest(teacher))
    assert not out.exists()  # no finished fold to reuse yet
    fold = tmp_path / "distilled-fold-4800" / "guided-16-steps"
    fold.mkdir(parents=True)
    (fold / "model_index.json").write_text("{}")
    recipe.bind_teacher(fold.parent, teacher)
    recipe.reuse_fold(args, out, recipe.teacher_digest(other))
    assert not out.exists()  # another teacher's fold is never reused
    recipe.reuse_fold(args, out, recipe.teacher_digest(teacher))
    assert (out / "guided-16-steps" / "model_index.json").read_text() == "{}"
    recipe.bind_teacher(out, teacher)
    shutil.rmtree(fold.parent)  # and back: the default round length finds it in the -r800 folder
    unbalanced = recipe.parse_args(["--round_balance_by", "none"])
    default = recipe.distill_dir(unbalanced, tmp_path)
    recipe.reuse_fold(unbalanced, default, recipe.teacher_digest(teacher))
    assert (default / "guided-16-steps" / "model_index.json").is_file()
    # a student folder is tied to its teacher: a replaced teacher never resumes (or ships) the old distillation
    with pytest.raises(ValueError, match="distils another teacher .* move that folder aside"):
        recipe.bind_teacher(out, other)
    recipe.bind_teacher(out, teacher)  # the same teacher resumes
    with pytest.raises(ValueError, match="no denoiser/.*safetensors"):
        recipe.bind_teacher(out, tmp_path / "not-a-pipeline")
    with pytest.raises(ValueError, match="must hold --student_guidance_scale 2"):
        recipe.fold_range(recipe.parse_args(["--guidance_range", "3", "8"]))
    with pytest.raises(ValueError, match="must hold --guidance_scale 4"):  # the teacher's, which it is compared with
        recipe.fold_range(recipe.parse_args(["--guidance_range", "1", "3"]))


def test_emoji_recipe_balanced_rounds_start_from_the_unbalanced_fold(tmp_path):
    """By default the halving rounds draw every concept equally often (``--round_balance_by hexcode``) in their own
    folder, ``distilled-fold-4800-by-hexcode``; the fold is made without balancing in ``distilled-fold-4800`` (the
    folder of the unbalanced rounds) and copied from there, so both students share one fold (and the teacher's
    evaluation made there)."""

    from conftest import load_script

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")
    args = recipe.parse_args([])
    out, base = recipe.distill_dir(args, tmp_path), recipe.distill_dir(args, tmp_path, rounds=False)
    assert (out.name, base.name) == ("distilled-fold-4800-by-hexcode", "distilled-fold-4800")
    assert recipe.distill_dir(recipe.parse_args(["--distill_steps", "800"]), tmp_path).name == \
        "distilled-fold-4800-r800-by-hexcode"
    assert recipe.distill_dir(recipe.parse_args(["--round_balance_by", "None"]), tmp_path) == base

    fold = _flags(recipe.distill_command(args, Path("models/emoji"), out, 0, None))
    rounds = _flags(recipe.distill_command(args, Path("models/emoji"), out, 2, recipe.round_balance(args)))
    assert fold["--rounds"] == "0" and "--balance_by" not in fold
    assert (rounds["--rounds"], rounds["--balance_by"]) == ("2", "hexcode")
    assert rounds["--train_data_dir"] == str(tmp_path / "data")
    teacher = tmp_path / "teacher"
    (teacher / "denoiser").mkdir(parents=True)
    (teacher / "denoiser" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (base / "guided-16-steps").mkdir(parents=True)
    (base / "guided-16-steps" / "model_index.json").write_text("{}")
    recipe.bind_teacher(base, teacher)
    digest = recipe.bind_teacher(out, teacher)
    recipe.reuse_fold(args, out, digest)
    assert (out / "guided-16-steps" / "model_index.json").is_file()
    (base / "eval-teacher-seeds3.json").write_text('{"train": {"top5": 0.8}}')  # made beside the fold: reused
    assert recipe.teacher_report(args, tmp_path, out, teacher, digest) == {"train": {"top5": 0.8}}


def test_emoji_recipe_ship_student_sets_its_guidance_and_distill_from_replaces_the_teacher(tmp_path):
    """Shipping sets the student's default guidance (its scheduler's) and returns the one it was distilled with;
    ``--distill_from`` replaces the work folder's teacher; without it, and without the teacher choice, the stage says
    what to run."""

    from conftest import load_script
    from ldm import ProgressiveDistillationScheduler

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")

    ProgressiveDistillationScheduler(num_distilled_steps=4, guidance_scale=4.0, guidance_scale_range=[1.0, 8.0],
                                     prediction_type="v_prediction").save_pretrained(tmp_path / "ship" / "scheduler")
    assert recipe.set_student_guidance(tmp_path / "ship", 2.0) == 4.0
    shipped = ProgressiveDistillationScheduler.from_pretrained(tmp_path / "ship", subfolder="scheduler")
    assert (shipped.config.guidance_scale, shipped.config.num_distilled_steps) == (2.0, 4)
    args = recipe.parse_args(["--distill_from", "models/emoji"])
    assert recipe.distill_teacher(args, tmp_path, None) == Path("models/emoji")
    with pytest.raises(ValueError, match="give --distill_from"):
        recipe.chosen_kind(tmp_path / "teacher-choice.json")


def test_emoji_recipe_cards_reproduce_command_names_every_recipe_flag_away_from_its_default():
    """The cards' reproduce command is the script with the recipe flags the shipping run set (lists and floats as
    typed), without the flags that only say where files live or which stages run; the defaults give the bare script."""
    from conftest import load_script

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")
    assert recipe.reproduce_command(recipe.parse_args([])) == "python training/make_emoji_model.py"
    args = recipe.parse_args(["--stages", "ship-student", "--refine_from", "models/emoji", "--distill_from",
                              "models/emoji", "--work_dir", "w", "--perturb_steps", "18000", "--distill_steps", "1000",
                              "--guidance_range", "1", "6", "--unet_channels", "64", "128", "256"])
    command = recipe.reproduce_command(args)
    assert command.startswith("python training/make_emoji_model.py ")
    words = command.split()
    assert _flags(words) == {"--perturb_steps": "18000", "--distill_steps": "1000", "--guidance_range": "1",
                             "--unet_channels": "64"}
    assert "--guidance_range 1 6" in command and "--unet_channels 64 128 256" in command
    assert not any(w in words for w in ("--stages", "--refine_from", "--distill_from", "--work_dir"))


def test_emoji_recipe_refine_stage_ships_the_refined_teacher_and_keeps_the_rows_of_gone_teachers(tmp_path):
    """``refine-teacher`` fine-tunes the continued teacher (or ``--refine_from``) on mid-noise logit-normal
    timesteps into its own folder, which ships with ``--balance_steps 0``; ``--refine_steps 0 --balance_steps 0``
    ships the continued one. The teachers' table keeps the rows of teachers whose folders are gone (from the shipped
    ``teachers.json``), and a refined row counts the steps, FLOPs and minutes of the run it started from. Without the
    teacher choice, the kind comes from the ``--refine_from`` pipeline's denoiser."""
    import json

    from conftest import load_script
    from ldm.flops import denoiser_training_flops

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")
    assert recipe.shipped_teacher(recipe.parse_args(["--refine_steps", "0", "--balance_steps", "0"]), tmp_path,
                                  "unet").name == "teacher-unet-long"
    args = recipe.parse_args(["--balance_steps", "0"])  # the refined teacher ships
    assert recipe.shipped_teacher(args, tmp_path, "unet").name == "teacher-unet-refine"
    assert recipe.long_teacher(args, tmp_path, "unet").name == "teacher-unet-long"
    flag = _flags(recipe.refine_command(args, tmp_path, Path("models/emoji"), tmp_path / "out"))
    assert flag["--pretrained_model_name_or_path"] == "models/emoji" and "--denoiser" not in flag
    assert (flag["--weighting_scheme"], flag["--logit_mean"], flag["--max_train_steps"]) == \
        ("logit_normal", "0", "2400") and "--balance_by" not in flag

    folder = tmp_path / "teacher-unet-refine"
    pipe = tiny_pipeline("unet", seed=0)
    pipe.save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"max_train_steps": 10, "train_batch_size": 4}))
    (tmp_path / "eval-teacher-unet-refine.json").write_text(json.dumps({"train": {"top5": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"refine-teacher": 5.0}))
    saved = [{"name": n, "steps": s, "pflop": 1.0, "minutes": m} for n, s, m in
             (("unet", 4000, 286), ("dit", 4000, 275), ("unet-long", 6000, 378))]
    rows = recipe.teacher_rows(args, tmp_path, "unet", saved)
    assert [r["name"] for r in rows] == ["unet", "dit", "unet-long", "unet-refine"] and rows[:3] == saved
    refined = rows[3]
    assert (refined["steps"], refined["minutes"], refined["eval"]) == (6010, 383.0, {"train": {"top5": 0.5}})
    assert refined["pflop"] == pytest.approx(1.0 + denoiser_training_flops(pipe.denoiser) * 40 / 1e15)

    assert recipe.chosen_kind(tmp_path / "teacher-choice.json", str(folder)) == "unet"
    (tmp_path / "teacher-choice.json").write_text(json.dumps({"chosen": "dit"}))
    assert recipe.chosen_kind(tmp_path / "teacher-choice.json", str(folder)) == "dit"  # the record wins


def _shipped_refined_teacher(tmp_path):
    """The recipe module, a shipped folder whose ``teachers.json`` ships ``unet-refine`` (each row naming the row it
    was made from), its rows, and the recipe's arguments refining from it."""
    import json

    from conftest import load_script

    recipe = load_script(Path(__file__).parents[1] / "training" / "make_emoji_model.py", "make_emoji_model")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    saved = [{"kind": "unet", "name": n, "from": f, "steps": s, "pflop": p, "minutes": m} for n, f, s, p, m in
             (("unet", None, 4000, 1.0, 286), ("unet-long", "unet", 6000, 1.5, 378),
              ("unet-refine", "unet-long", 8400, 2.1, 499))]
    (shipped / "teachers.json").write_text(json.dumps({"rows": saved, "shipped": "unet-refine"}))
    return recipe, shipped, saved, recipe.parse_args(["--refine_from", str(shipped)])


def test_emoji_recipe_balance_stage_refines_the_refined_teacher_with_every_concept_equally_often(tmp_path):
    """``balance-teacher`` (on by default) runs the refine recipe again from the refined teacher with
    ``--balance_by hexcode`` into ``teacher-KIND-refine-balanced``, which ships; without the work folder's refined
    teacher it starts from ``--refine_from``."""
    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    assert recipe.STAGES.index("refine-teacher") < recipe.STAGES.index("balance-teacher") < \
        recipe.STAGES.index("ship-teacher")
    assert recipe.shipped_teacher(args, tmp_path, "unet").name == "teacher-unet-refine-balanced"
    assert recipe.shipped_teacher(recipe.parse_args(["--refine_steps", "0"]), tmp_path, "unet").name == \
        "teacher-unet-long-balanced"
    assert recipe.balance_start(args, tmp_path, "unet") == shipped  # the work folder's refined teacher is gone
    cmd = [str(c) for c in recipe.refine_command(args, tmp_path, shipped, tmp_path / "out", "balance-teacher")]
    assert cmd[cmd.index("--balance_by") + 1] == "hexcode" and cmd[cmd.index("--max_train_steps") + 1] == "2400"
    refine = recipe.parse_args(["--balance_steps", "1", "--balance_by", "group"])
    cmd = [str(c) for c in recipe.refine_command(refine, tmp_path, shipped, tmp_path / "out", "balance-teacher")]
    assert cmd[cmd.index("--balance_by") + 1] == "group" and cmd[cmd.index("--max_train_steps") + 1] == "1"


def test_emoji_recipe_longer_balance_trains_the_finished_run_on_from_its_last_checkpoint(tmp_path):
    """``--balance_steps`` above a finished run's: the run is trained on in place (its marker goes, so a cut-off run
    resumes, and its evaluation is kept under its step count); the card says where the schedule restarted. The same
    length or fewer leaves it alone; a run without its last checkpoint is refused."""
    import json

    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    out, report = tmp_path / "teacher-unet-refine-balanced", tmp_path / "eval-teacher-unet-refine-balanced.json"
    (out / "checkpoint-2400").mkdir(parents=True)
    for name, content in (("model_index.json", {}), ("training_args.json", {
            "max_train_steps": 2400, "pretrained_model_name_or_path": "models/emoji", "balance_by": "hexcode"})):
        (out / name).write_text(json.dumps(content))
    report.write_text("{}")
    assert not recipe.lengthen(out, 2400, report) and not recipe.lengthen(out, 1200, report)
    assert recipe.balance_note(out).count("restarting warm") == 0
    assert recipe.lengthen(out, 4800, report)
    assert not (out / "model_index.json").exists() and not report.exists()
    assert (tmp_path / "eval-teacher-unet-refine-balanced-2400.json").is_file()
    assert recipe.lengthen(out, 4800, report)  # cut off before it finished: still to train
    assert recipe.recorded_start(out, tmp_path / "teacher-unet-refine") == Path("models/emoji")  # what it began from
    assert recipe.recorded_start(tmp_path / "new", shipped) == shipped
    assert "trained on from its step-2400 checkpoint" in recipe.balance_note(out)
    (out / "model_index.json").write_text("{}")
    (out / "training_args.json").write_text(json.dumps({
        "max_train_steps": 4800, "pretrained_model_name_or_path": "models/emoji", "balance_by": "hexcode"}))
    assert "(`--balance_steps 2400`, then `--balance_steps 4800`, `--balance_by`" in recipe.balance_note(out)
    with pytest.raises(ValueError, match="no checkpoint-4800 to go on to 7200 from: move that folder aside"):
        recipe.lengthen(out, 7200, report)


def test_emoji_recipe_records_a_cut_off_run_resumed_at_another_length(tmp_path):
    """A run cut off before it finished and asked for another length goes on from its last complete checkpoint under
    the new schedule: ``legs.json`` records ``[step, cut run's length]`` once, and the card names both lengths. The
    same length resumes with nothing recorded."""
    import json

    from ldm.checkpointing import STATE_FILE

    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    out, report = tmp_path / "teacher-unet-refine-balanced-perturbed", tmp_path / "eval.json"
    run = {"pretrained_model_name_or_path": "models/emoji", "balance_by": "hexcode", "input_perturbation": 0.1}
    (out / "checkpoint-6600").mkdir(parents=True)  # an incomplete checkpoint (no state) is passed over
    (out / "checkpoint-6500").mkdir()
    (out / "checkpoint-6500" / STATE_FILE).write_text(json.dumps({"step": 6500, "epoch": 1, "batches_in_epoch": 0}))
    (out / "legs.json").write_text(json.dumps([4000]))
    (out / "training_args.json").write_text(json.dumps(dict(run, max_train_steps=11000)))
    assert recipe.lengthen(out, 11000, report) and recipe.recorded_legs(out) == [4000]  # resumes as it was
    for _ in range(2):  # the second time, a rerun that stopped before training began
        assert recipe.lengthen(out, 10000, report)
        assert recipe.recorded_legs(out) == [4000, [6500, 11000]]
    (out / "training_args.json").write_text(json.dumps(dict(run, max_train_steps=10000)))
    _, restart, runs = recipe.legs_text(out, "--perturb_steps")
    assert runs == "`--perturb_steps 4000`, then `--perturb_steps 11000` stopped at step 6500, then " \
                   "`--perturb_steps 10000`"
    assert restart == " (trained on from its step-4000 and step-6500 checkpoints in turn, the cosine schedule " \
                      "restarting warm each time)"
    fresh = tmp_path / "fresh"  # nothing trained yet: nothing to record
    fresh.mkdir()
    assert recipe.lengthen(fresh, 10, report) and recipe.recorded_legs(fresh) == []


def test_emoji_recipe_balanced_row_adds_to_the_row_it_started_from(tmp_path):
    """The balanced teacher's row adds its own stage time to the row it started from: a work folder's, or the one a
    shipped pipeline names in its ``teachers.json`` (``shipped``), and when that record ships the balanced teacher or
    one made from it, the row the record says it was made from (``from``); a record that cannot say is refused."""
    import json

    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    folder = tmp_path / "teacher-unet-refine-balanced"
    tiny_pipeline("unet", seed=0).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"max_train_steps": 10, "train_batch_size": 4}))
    (tmp_path / "eval-teacher-unet-refine-balanced.json").write_text(json.dumps({"train": {"top5": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"refine-teacher": 120.0, "balance-teacher": 7.0}))
    rows = recipe.teacher_rows(args, tmp_path, "unet", saved)
    assert [r["name"] for r in rows] == ["unet", "unet-long", "unet-refine", "unet-refine-balanced"]
    assert (rows[3]["steps"], rows[3]["minutes"]) == (8410, 506.0)
    assert rows[3]["from"] == "unet-refine" and rows[:3] == saved
    # a record that ships the balanced teacher (re-shipping it), or a teacher made from it, gives the row it was made
    # from, whatever the names; a record that cannot say is refused
    named = saved + [{"kind": "unet", "name": "unet-refine-balanced", "from": "unet-refine", "steps": 1},
                     {"kind": "unet", "name": "x", "from": "unet-refine-balanced", "steps": 1}]
    for ships in ("unet-refine-balanced", "x"):
        (shipped / "teachers.json").write_text(json.dumps({"rows": named, "shipped": ships}))
        assert recipe.teacher_rows(args, tmp_path, "unet", saved)[3]["steps"] == 8410
    (shipped / "teachers.json").write_text(json.dumps({"rows": saved}))  # no "shipped"
    with pytest.raises(ValueError, match="needs 'shipped'"):
        recipe.teacher_rows(args, tmp_path, "unet", saved)
    (shipped / "teachers.json").write_text(json.dumps({"rows": saved + [{"name": "unet-refine-balanced"}],
                                                        "shipped": "unet-refine-balanced"}))  # no "from"
    with pytest.raises(ValueError, match="re-ship the teacher"):
        recipe.teacher_rows(args, tmp_path, "unet", saved)
    # with the work folder's refined teacher, the balanced one starts from it and adds to its (measured) row, whose
    # own base is the row the record ships (no longer the refined one: its record says what that was made from)
    (shipped / "teachers.json").write_text(json.dumps({"rows": named, "shipped": "unet-refine-balanced"}))
    refined = tmp_path / "teacher-unet-refine"
    tiny_pipeline("unet", seed=0).save_pretrained(refined)
    (refined / "training_args.json").write_text(json.dumps({"max_train_steps": 20, "train_batch_size": 4}))
    (tmp_path / "eval-teacher-unet-refine.json").write_text(json.dumps({"train": {"top5": 0.4}}))
    assert recipe.balance_start(args, tmp_path, "unet") == refined
    rows = recipe.teacher_rows(args, tmp_path, "unet", saved)
    assert [(r["name"], r["steps"], r["minutes"]) for r in rows[2:]] == \
        [("unet-refine", 6020, 498.0), ("unet-refine-balanced", 6030, 505.0)]


def test_emoji_recipe_perturb_stage_trains_the_balanced_teacher_on_with_input_perturbation(tmp_path):
    """``perturb-teacher`` (off by default) runs the balance recipe again from the balanced teacher (or
    ``--refine_from``) with ``--input_perturbation`` into ``...-balanced-perturbed``, which then ships; its row adds
    to the balanced one's, and the card tells both stages."""
    import json

    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    assert recipe.STAGES.index("balance-teacher") < recipe.STAGES.index("perturb-teacher") < \
        recipe.STAGES.index("ship-teacher")
    assert recipe.shipped_teacher(args, tmp_path, "unet").name == "teacher-unet-refine-balanced"  # off by default
    assert recipe.refine_stage(args, tmp_path, "unet", "perturb-teacher")[0] == 0
    perturb = recipe.parse_args(["--refine_from", str(shipped), "--perturb_steps", "3"])
    assert recipe.shipped_teacher(perturb, tmp_path, "unet").name == "teacher-unet-refine-balanced-perturbed"
    assert recipe.refine_stage(perturb, tmp_path, "unet", "perturb-teacher") == \
        (3, tmp_path / "teacher-unet-refine-balanced-perturbed", shipped)  # the work folder's balanced one is gone
    flag = _flags(recipe.refine_command(perturb, tmp_path, shipped, tmp_path / "out", "perturb-teacher"))
    assert (flag["--input_perturbation"], flag["--balance_by"], flag["--max_train_steps"], flag["--weighting_scheme"]) \
        == ("0.1", "hexcode", "3", "logit_normal")
    assert "--input_perturbation" not in _flags(recipe.refine_command(perturb, tmp_path, shipped, tmp_path / "o",
                                                                      "balance-teacher"))

    run = {"train_batch_size": 4, "pretrained_model_name_or_path": "models/emoji", "balance_by": "hexcode",
           "input_perturbation": 0.1}
    for name, steps in (("teacher-unet-refine-balanced", 10), ("teacher-unet-refine-balanced-perturbed", 5)):
        tiny_pipeline("unet", seed=0).save_pretrained(tmp_path / name)
        (tmp_path / name / "training_args.json").write_text(json.dumps(dict(run, max_train_steps=steps)))
        (tmp_path / f"eval-{name}.json").write_text(json.dumps({"train": {"top5": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"balance-teacher": 7.0, "perturb-teacher": 2.0}))
    assert recipe.perturb_start(perturb, tmp_path, "unet") == tmp_path / "teacher-unet-refine-balanced"
    rows = recipe.teacher_rows(perturb, tmp_path, "unet", saved)
    assert [(r["name"], r["from"], r["steps"], r["minutes"]) for r in rows[3:]] == \
        [("unet-refine-balanced", "unet-refine", 8410, 506.0),
         ("unet-refine-balanced-perturbed", "unet-refine-balanced", 8415, 508.0)]
    out = recipe.shipped_teacher(perturb, tmp_path, "unet")
    assert "`--balance_steps 10`" in recipe.balance_note(out) and "`--perturb_steps 5`" in recipe.perturb_note(out)
    assert recipe.perturb_note(tmp_path / "teacher-unet-refine-balanced") == ""
    unbalanced = recipe.parse_args(["--refine_from", str(shipped), "--perturb_steps", "3", "--balance_steps", "0"])
    refined_perturbed = tmp_path / "teacher-unet-refine-perturbed"  # without balancing it perturbs the refined one
    assert recipe.shipped_teacher(unbalanced, tmp_path, "unet") == refined_perturbed
    shutil.copytree(out, refined_perturbed)
    shutil.copy(tmp_path / f"eval-{out.name}.json", tmp_path / f"eval-{refined_perturbed.name}.json")
    assert recipe.teacher_rows(unbalanced, tmp_path, "unet", saved)[-1]["name"] == "unet-refine-perturbed"
    assert recipe.balance_note(refined_perturbed) == ""
    shutil.rmtree(tmp_path / "teacher-unet-refine-balanced")  # trained from the shipped one: the stage in a line
    assert recipe.balance_note(out).strip().startswith("Then `--stages balance-teacher` ran that refinement again")
    recorded = {"balance-teacher": "\nwhat the card said when the balanced teacher shipped"}  # teachers.json keeps it
    assert recipe.balance_note(out, recorded) == recorded["balance-teacher"]
    assert list(recipe.later_notes(out, recorded)) == ["balance-teacher", "perturb-teacher"]
    assert recipe.later_notes(tmp_path / "teacher-unet-refine") == {}


def test_emoji_recipe_restyle_stage_trains_the_perturbed_teacher_on_the_default_style_data(tmp_path):
    """``restyle-teacher`` (off by default) runs the perturb recipe again from the perturbed teacher on the data
    built with ``--default_style``, into ``...-perturbed-noto-default``, which then ships and which the student
    distils on the same data; its row adds to the perturbed one's, and the card tells all three later stages."""
    import json

    recipe, shipped, saved, args = _shipped_refined_teacher(tmp_path)
    assert recipe.STAGES.index("perturb-teacher") < recipe.STAGES.index("restyle-teacher") < \
        recipe.STAGES.index("ship-teacher")
    perturb = recipe.parse_args(["--refine_from", str(shipped), "--perturb_steps", "3"])
    restyle = recipe.parse_args(["--refine_from", str(shipped), "--perturb_steps", "3", "--restyle_steps", "2"])
    assert recipe.refine_stage(perturb, tmp_path, "unet", "restyle-teacher")[0] == 0  # off by default
    assert recipe.restyle_data(perturb, tmp_path) == tmp_path / "data"
    out = tmp_path / "teacher-unet-refine-balanced-perturbed-noto-default"
    assert recipe.refine_stage(restyle, tmp_path, "unet", "restyle-teacher") == (2, out, shipped)
    assert recipe.shipped_teacher(restyle, tmp_path, "unet") == recipe.distill_teacher(restyle, tmp_path, "unet") == out
    flag = _flags(recipe.refine_command(restyle, tmp_path, shipped, out, "restyle-teacher"))
    assert (flag["--train_data_dir"], flag["--max_train_steps"], flag["--input_perturbation"], flag["--balance_by"]) \
        == (str(tmp_path / "data-noto-default"), "2", "0.1", "hexcode")
    assert _flags(recipe.refine_command(restyle, tmp_path, shipped, out, "perturb-teacher"))["--train_data_dir"] == \
        str(tmp_path / "data")
    student = recipe.distill_dir(restyle, tmp_path)
    assert _flags(recipe.distill_command(restyle, out, student, 2, None))["--train_data_dir"] == \
        str(tmp_path / "data-noto-default")

    run = {"train_batch_size": 4, "pretrained_model_name_or_path": "models/emoji", "balance_by": "hexcode",
           "input_perturbation": 0.1}
    for name, steps in (("teacher-unet-refine-balanced", 10), ("teacher-unet-refine-balanced-perturbed", 5),
                        (out.name, 2)):
        tiny_pipeline("unet", seed=0).save_pretrained(tmp_path / name)
        data = "data-noto-default" if name == out.name else "data"
        (tmp_path / name / "training_args.json").write_text(json.dumps(dict(run, max_train_steps=steps,
                                                                            train_data_dir=f"w/{data}")))
        (tmp_path / f"eval-{name}.json").write_text(json.dumps({"train": {"top5": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"perturb-teacher": 2.0, "restyle-teacher": 1.0}))
    rows = recipe.teacher_rows(restyle, tmp_path, "unet", saved)
    assert [(r["name"], r["from"], r["steps"]) for r in rows[-2:]] == \
        [("unet-refine-balanced-perturbed", "unet-refine-balanced", 8415),
         ("unet-refine-balanced-perturbed-noto-default", "unet-refine-balanced-perturbed", 8417)]
    notes = recipe.later_notes(out)
    assert list(notes) == ["balance-teacher", "perturb-teacher", "restyle-teacher"]
    assert "`--restyle_steps 2`" in notes["restyle-teacher"] and "`--default_style Noto`" in notes["restyle-teacher"]
    assert "`w/data-noto-default`" in notes["restyle-teacher"] and "`--perturb_steps 5`" in notes["perturb-teacher"]
    assert recipe.restyle_note(tmp_path / "teacher-unet-refine-balanced-perturbed") == ""
