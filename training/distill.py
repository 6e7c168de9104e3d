#!/usr/bin/env python
"""Progressive distillation of a LatentPipeline into few-step students (Salimans & Ho 2022, Algorithm 2).

    accelerate launch training/distill.py --teacher <pipeline> --teacher_steps 64 --rounds 4 \
        --dataset_name shapes --steps_per_round 2000 --output_dir distilled [--guidance_distillation]

Each round copies the teacher into a student and trains it so that one of its DDIM steps matches two of the
teacher's (targets in ``ldm.distillation``), halving the step count: 64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1. Students
predict v. Every round is saved as a complete pipeline ``round-<r>-<N>-steps/`` with a
``ProgressiveDistillationScheduler`` and a model card; a re-run skips finished rounds and resumes the unfinished one
from its checkpoints.

``--guidance_distillation`` first folds classifier-free guidance into the model (Meng et al. 2023, stage 1): a
student that also takes the guidance scale s learns x_u + s (x_c - x_u) of the teacher, then the rounds distil that
student; the resulting pipelines take ``guidance_scale`` but run one denoiser forward per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

logger = logging.getLogger("distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ldm.data.image_caption import add_data_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="LatentPipeline folder or Hub id (v or x prediction preferred)")
    p.add_argument("--revision", default=None)
    p.add_argument("--teacher_steps", type=int, default=64, help="steps of the teacher's grid in the first round")
    p.add_argument("--rounds", type=int, default=4, help="halvings: 64 steps and 4 rounds give a 4-step student")
    p.add_argument("--steps_per_round", type=int, default=2000, help="optimizer steps per round")
    p.add_argument("--guidance_distillation", action="store_true",
                   help="fold classifier-free guidance into the students (one forward per step)")
    p.add_argument("--guidance_steps", type=int, default=None, help="steps of the guidance stage (default: a round)")
    p.add_argument("--guidance_learning_rate", type=float, default=None,
                   help="peak learning rate of the guidance stage (default: --learning_rate)")
    p.add_argument("--guidance_scale_min", type=float, default=1.0)
    p.add_argument("--guidance_scale_max", type=float, default=8.0)
    p.add_argument("--default_guidance_scale", type=float, default=5.0,
                   help="the guidance scale guided students sample with by default")
    p.add_argument("--caption_dropout", type=float, default=0.1,
                   help="empty-caption probability, so unguided students keep classifier-free guidance")
    g = add_data_arguments(p, None, "default: the teacher's sample size", balance=True)
    g.add_argument("--cache_latents", action="store_true")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=16)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--vae_dtype", choices=["fp32", "weight"], default="fp32",
                   help="the frozen VAE in float32 (default) or in the mixed-precision dtype")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="ldm-distilled")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--report_to", default="tensorboard")
    g.add_argument("--license", default="apache-2.0")
    args = p.parse_args(argv)
    from ldm.train_loop import check_counts

    check_counts(args)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give --dataset_name or --train_data_dir (the images the teacher's prompts come from).")
    if not 0 < args.guidance_scale_min <= args.default_guidance_scale <= args.guidance_scale_max:
        raise ValueError("Need 0 < --guidance_scale_min <= --default_guidance_scale <= --guidance_scale_max, got "
                         f"{args.guidance_scale_min}, {args.default_guidance_scale}, {args.guidance_scale_max}.")
    if args.rounds < 0 or (args.rounds == 0 and not args.guidance_distillation):
        raise ValueError(f"--rounds {args.rounds}: give at least 1 halving round, or 0 with --guidance_distillation "
                         f"to fold guidance in only.")
    if args.teacher_steps % (2 ** args.rounds):
        raise ValueError(f"--teacher_steps {args.teacher_steps} cannot be halved {args.rounds} times exactly; "
                         f"use a power of two such as 64.")
    return args


@dataclass
class Stage:
    """One distillation stage: a guidance fold (``student_steps == teacher_steps``) or a halving round."""

    name: str
    teacher_steps: int
    student_steps: int
    round: int
    guided_teacher: bool  # the teacher takes the guidance scale as input
    guided_student: bool

    @property
    def folder(self) -> str:
        return self.name


def plan_stages(args) -> list[Stage]:
    stages = []
    guided = args.guidance_distillation
    if guided:
        stages.append(Stage(f"guided-{args.teacher_steps}-steps", args.teacher_steps, args.teacher_steps, 0,
                            False, True))
    for r in range(1, args.rounds + 1):
        n = args.teacher_steps // 2 ** r
        stages.append(Stage(f"round-{r}-{n}-steps", 2 * n, n, r, guided, guided))
    return stages


def make_student(teacher, guided_student: bool):
    """A trainable copy of the teacher; for the guidance fold, with a guidance embedding that starts at zero, so
    the student starts out equal to the teacher's conditional branch."""
    if not guided_student or teacher.config.guidance_embedding:
        return copy.deepcopy(teacher).train().requires_grad_(True)
    # a keyword, not a config entry: from_config drops entries the teacher left at their defaults
    student = type(teacher).from_config(teacher.config, guidance_embedding=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embed.guidance") for k in missing), (missing, unexpected)
    final = student.time_embed.guidance_embedding.linear_2
    torch.nn.init.zeros_(final.weight)
    torch.nn.init.zeros_(final.bias)
    return student.train().requires_grad_(True)


def main(args: argparse.Namespace) -> Path:
    from ldm import ProgressiveDistillationScheduler
    from ldm.components import load_frozen_components, load_pipeline_denoiser
    from ldm.distributed import make_accelerator, tracker_config

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(output_dir, args.gradient_accumulation_steps, args.mixed_precision,
                                   args.report_to, "logs", args.seed)
    vae, text_encoder, tokenizer = load_frozen_components(args.teacher, revision=args.revision)
    base = load_pipeline_denoiser(args.teacher, args.revision)
    teacher_config = json.loads(Path(_local(args.teacher, args.revision), "scheduler",
                                     "scheduler_config.json").read_text())
    if "FlowMatch" in teacher_config.get("_class_name", ""):
        raise ValueError(
            f"{args.teacher} is a flow-matching teacher ({teacher_config['_class_name']}). Progressive distillation "
            "here is built on the DDPM family's alpha/sigma (ProgressiveDistillationScheduler, DDIM steps). The "
            "halving argument holds for any deterministic ODE sampler, flow's Euler steps included, but that "
            "student scheduler is not implemented: distil a DDPM-family teacher (v_prediction, zero-SNR works best)."
        )
    kind = teacher_config.get("prediction_type", "epsilon")
    schedule = {k: teacher_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                               "trained_betas", "rescale_betas_zero_snr") if k in teacher_config}
    if kind == "epsilon":
        logger.warning("The teacher predicts epsilon; students predict v and start from its weights. Distillation "
                       "works best from a v-prediction teacher on a zero-terminal-SNR schedule.")
    if not schedule.get("rescale_betas_zero_snr"):
        logger.warning("The teacher's schedule does not reach zero SNR: the top of the grid is not pure noise, so "
                       "few-step students start from a slightly wrong distribution.")

    def scheduler_for(stage: Stage, prediction_type: str) -> ProgressiveDistillationScheduler:
        return ProgressiveDistillationScheduler(
            **schedule, prediction_type=prediction_type, num_distilled_steps=stage.student_steps,
            teacher_steps=stage.teacher_steps, distillation_round=stage.round,
            guidance_scale=args.default_guidance_scale if stage.guided_student else None,
            guidance_scale_range=[args.guidance_scale_min, args.guidance_scale_max] if stage.guided_student else None,
            timestep_spacing="trailing")

    if accelerator.is_main_process:  # one run; each stage logs its own curves ("round-1-32-steps/loss", ...)
        accelerator.init_trackers("distill", config=tracker_config(args))
    teacher, teacher_kind = base, kind
    for stage in plan_stages(args):
        stage_dir = output_dir / stage.folder
        if (stage_dir / "model_index.json").is_file():
            logger.info("%s is done; using it as the next teacher.", stage_dir)
            teacher, teacher_kind = load_pipeline_denoiser(str(stage_dir)), "v_prediction"
            continue
        student = make_student(teacher, stage.guided_student)
        student = train_stage(args, accelerator, stage, teacher, teacher_kind, student, vae, text_encoder, tokenizer,
                              scheduler_for(stage, teacher_kind), scheduler_for(stage, "v_prediction"))
        if accelerator.is_main_process:
            save_stage(args, stage, student, vae, text_encoder, tokenizer, scheduler_for(stage, "v_prediction"))
        accelerator.wait_for_everyone()
        teacher, teacher_kind = student, "v_prediction"
    accelerator.end_training()
    return output_dir


def _local(path: str, revision: str | None) -> str:
    from pipelines import LatentPipeline

    return path if Path(path).is_dir() else LatentPipeline.download(path, revision=revision)


@dataclass
class StageModels:
    """Everything one distillation step reads: the stage, the frozen teacher, the student and their schedulers."""

    args: argparse.Namespace
    accelerator: object
    stage: Stage
    teacher: torch.nn.Module
    student: torch.nn.Module
    encoder: object  # ldm.training_step.BatchEncoder
    teacher_sched: object
    student_sched: object

    def teacher_x0(self, z, tau, embeds, mask, scale=None) -> torch.Tensor:
        """The frozen teacher's x0 (B, C, H, W) at z, tau (no autograd)."""
        with torch.no_grad(), self.accelerator.autocast():
            out = self.teacher(z, tau.to(z.device), embeds, encoder_attention_mask=mask, guidance=scale).sample
        return self.teacher_sched.predict_x0(out[:, : z.shape[1]].float(), tau, z)


def distillation_step(m: StageModels, batch: dict, generator: torch.Generator):
    """The loss of one micro-batch: max(SNR, 1) |x_student - x~|^2 with x~ the stage's teacher target."""
    from ldm.distillation import guidance_fold_target, sample_fold_times, sample_student_times, two_step_target, x_loss
    from ldm.guidance import drop_captions, sample_scales
    from ldm.losses import LossOutput
    from ldm.training_step import draw_noise

    latents, embeds, mask = m.encoder(batch, generator)
    n, device, stage = latents.shape[0], latents.device, m.stage
    noise = draw_noise(latents.shape, 0.0, generator).to(device)
    scale = None
    if stage.guided_student:
        scale = sample_scales(m.args.guidance_scale_min, m.args.guidance_scale_max, n, generator).to(device)
    else:  # keep the unconditional branch alive for classifier-free guidance at sampling time
        embeds, mask = drop_captions(embeds, mask, m.encoder.empty_embeds, m.encoder.empty_mask,
                                     m.args.caption_dropout, generator)
    if stage.round == 0:  # guidance fold on the teacher's grid: match x_u + s (x_c - x_u)
        tau = sample_fold_times(m.teacher_sched, stage.teacher_steps, n, generator)
        z_t = m.teacher_sched.add_noise(latents, noise, tau)
        target = guidance_fold_target(m.teacher_x0, z_t, tau, embeds, mask, m.encoder.empty_embeds,
                                      m.encoder.empty_mask, scale)
    else:  # halving round: one student step = two teacher steps
        tau, tau_mid, tau_next = sample_student_times(m.teacher_sched, stage.student_steps, n, generator)
        z_t = m.teacher_sched.add_noise(latents, noise, tau)
        target, _ = two_step_target(lambda z, t: m.teacher_x0(z, t, embeds, mask, scale), m.teacher_sched, z_t, tau,
                                    tau_mid, tau_next)
    v = m.student(z_t, tau.to(device), embeds, encoder_attention_mask=mask, guidance=scale).sample
    x_pred = m.student_sched.predict_x0(v[:, : z_t.shape[1]].float(), tau, z_t)
    loss = x_loss(m.student_sched, x_pred, target, tau)
    return LossOutput(loss=loss, mse=(x_pred.detach() - target).pow(2).mean())


STAGE_ARGUMENTS = ("teacher", "revision", "teacher_steps", "rounds", "steps_per_round", "guidance_distillation",
                   "guidance_steps", "guidance_learning_rate", "guidance_scale_min", "guidance_scale_max",
                   "caption_dropout", "dataset_name", "train_data_dir", "max_train_samples", "resolution",
                   "random_flip", "balance_by", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
                   "use_ema", "ema_decay", "seed", "mixed_precision")


def check_stage_arguments(args, stage: Stage, work_dir: Path) -> None:
    """A stage's work folder resumes only a run with the same defining arguments: they are written to
    ``stage_args.json`` when it starts and compared on every re-run (a changed ``--teacher`` would otherwise
    silently continue the old run)."""
    wanted = {k: getattr(args, k) for k in STAGE_ARGUMENTS} | {"stage": stage.name}
    record = work_dir / "stage_args.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"{work_dir} holds a run of this stage started with other arguments ({detail}). "
                             "Delete that folder to start the stage again with the new ones, or rerun with the old.")
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=2))


def prepare_stage(args, accelerator, stage: Stage, student, vae, text_encoder, tokenizer, resolution: int):
    """The stage's data, optimizer, linear-to-zero learning rate and EMA, prepared by accelerate."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ldm.data.image_caption import DataArgs
    from ldm.data.loader import make_train_dataloader
    from ldm.train_loop import make_optimizer

    data_args = DataArgs.from_args(args, resolution)
    loader, _ = make_train_dataloader(accelerator, data_args, vae, text_encoder, tokenizer, args.train_batch_size,
                                      args.cache_latents, str(Path(args.output_dir) / "cache"), args.random_flip,
                                      args.dataloader_num_workers)
    params = list(student.parameters())
    fold = stage.round == 0
    learning_rate = (args.guidance_learning_rate or args.learning_rate) if fold else args.learning_rate
    optimizer = make_optimizer(params, learning_rate, weight_decay=args.adam_weight_decay)
    max_steps = (args.guidance_steps or args.steps_per_round) if fold else args.steps_per_round
    lr_scheduler = get_scheduler("linear", optimizer,  # annealed to 0 within each round, as in Salimans & Ho
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    ema = None
    if args.use_ema:
        ema = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=type(student),
                       model_config=student.config)
        ema.to(accelerator.device)
    student, optimizer, loader, lr_scheduler = accelerator.prepare(student, optimizer, loader, lr_scheduler)
    return student, optimizer, loader, lr_scheduler, params, ema, max_steps, learning_rate


def train_stage(args, accelerator, stage: Stage, teacher, teacher_kind: str, student, vae, text_encoder, tokenizer,
                teacher_sched, student_sched):
    """Train ``student`` for one stage against the frozen ``teacher``; returns the (unwrapped) student."""
    from ldm.distributed import check_in_sync, vae_dtype_of, weight_dtype_of
    from ldm.latents import vae_scale_factor
    from ldm.train_loop import LoopConfig, run_training
    from ldm.training_step import BatchEncoder

    accelerator.free_memory()
    weight_dtype = weight_dtype_of(accelerator)
    vae.to(accelerator.device, dtype=vae_dtype_of(accelerator, args.vae_dtype))
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    resolution = args.resolution or teacher.config.sample_size * vae_scale_factor(vae)
    student, optimizer, loader, lr_scheduler, _, ema, max_steps, learning_rate = prepare_stage(
        args, accelerator, stage, student, vae, text_encoder, tokenizer, resolution)
    encoder = BatchEncoder(vae, text_encoder, tokenizer, args.random_flip)
    models = StageModels(args, accelerator, stage, teacher, student, encoder, teacher_sched, student_sched)
    work_dir = Path(args.output_dir) / f"work-{stage.folder}"
    if accelerator.is_main_process:
        check_stage_arguments(args, stage, work_dir)
    accelerator.wait_for_everyone()
    loop = LoopConfig(work_dir, max_steps, args.checkpointing_steps, args.checkpoints_total_limit, "latest",
                      args.max_grad_norm, args.gradient_accumulation_steps, args.seed, desc=stage.folder,
                      log_prefix=f"{stage.folder}/", always_resumes=True,
                      images_per_step=accelerator.num_processes * args.train_batch_size
                      * args.gradient_accumulation_steps)
    logger.info("Stage %s: %d -> %d steps%s, %d optimizer steps, peak learning rate %g", stage.folder,
                stage.teacher_steps, stage.student_steps, " (guidance folded in)" if stage.guided_student else "",
                max_steps, learning_rate)
    run_training(accelerator, student, optimizer, lr_scheduler, loader, partial(distillation_step, models), loop,
                 ema=ema)
    unwrapped = accelerator.unwrap_model(student)
    check_in_sync(accelerator, unwrapped)
    if ema is not None:
        ema.copy_to(unwrapped.parameters())
    return unwrapped.eval().requires_grad_(False)


def save_stage(args, stage: Stage, student, vae, text_encoder, tokenizer, scheduler) -> None:
    """Save the stage's student as a complete pipeline with its scheduler and a model card, then drop the
    stage's checkpoints."""
    from ldm.components import load_frozen_components
    from ldm.model_card import render_model_card
    from pipelines import LatentPipeline

    stage_dir = Path(args.output_dir) / stage.folder
    vae, text_encoder, tokenizer = load_frozen_components(args.teacher, revision=args.revision)  # fp32 copies
    pipe = LatentPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, denoiser=student.float(),
                          scheduler=scheduler)
    tmp = stage_dir.with_name(f".tmp-{stage.folder}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    images = None
    if args.validation_prompts:
        from diffusers.utils import make_image_grid

        pipe.set_progress_bar_config(disable=True)
        images = pipe(args.validation_prompts, generator=torch.Generator().manual_seed(args.seed)).images
        make_image_grid(images, rows=1, cols=len(images)).save(tmp / "validation.png")
    render_model_card(  # written into the temporary folder, so name the final one
        tmp, "distilled", repo_id=stage_dir.name, base_model=args.teacher, datasets=args.dataset_name,
        license=args.license,
        tags=["progressive-distillation", *(["guidance-distillation"] if stage.guided_student else [])],
        hyperparameters={k: v for k, v in vars(args).items() if v is not None and k != "output_dir"},
        model_name=f"{Path(args.teacher).name} distilled to {stage.student_steps} steps",
        teacher=args.teacher, teacher_steps=stage.teacher_steps, student_steps=stage.student_steps,
        distillation_round=stage.round, guided=stage.guided_student, guidance_scale=args.default_guidance_scale,
        denoiser_class=type(student).__name__, validation_image="validation.png" if images else None,
        validation_prompts=args.validation_prompts,
        example_prompt=args.validation_prompts[0] if args.validation_prompts else None,
    )
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp.rename(stage_dir)  # the stage counts as done only once its folder is complete
    shutil.rmtree(Path(args.output_dir) / f"work-{stage.folder}", ignore_errors=True)
    logger.info("Saved %s (%d-step student)", stage_dir, stage.student_steps)


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script("distill", main, parse_args)
