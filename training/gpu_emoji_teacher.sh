#!/usr/bin/env bash
# Train the shipped emoji teacher on for many more steps on a lent GPU (the `device` tool), from the repo root.
#
# Why: the CPU-trained teacher (8,400 steps of 64, about 77 epochs) knows colour and coarse layout but few shapes
# (README, "The bundled emoji model"); a GPU trains an order of magnitude more steps in minutes.
#
#   1. here: `python -m ldm.data.emoji --out work/emoji/data` (41 MB) and the wheels the device image lacks
#      (diffusers, datasets: bench/README.md, "gpu_check.sh", says how) into .whl/;
#   2. device `run`, carry [".whl", "work/emoji/data"]:
#        STEPS=20000 BATCH=256 bash training/gpu_emoji_teacher.sh
#      -> $OUT/train.log and $OUT/denoiser/ (the EMA denoiser in float16, in safetensors shards of at most 15 MB,
#         because the device returns files of at most 16 MiB);
#   3. here: `python training/gpu_emoji_teacher.py --denoiser <files_at>/denoiser --out work/emoji/teacher-gpu`
#      assembles the pipeline (models/emoji's VAE, text encoder, tokenizer, scheduler), then evaluate it with
#      `training/evaluate.py --suite emoji` as the README says.
#
# The recipe is make_emoji_model.py's teacher (v-prediction, zero-terminal SNR, 10 % caption dropout, EMA, cached
# latents), fine-tuned from models/emoji's weights in bf16, each concept drawn equally often (BALANCE=hexcode, the
# default: --balance_by; BALANCE= draws every render equally often, as the CPU teacher was trained). Smoke-test on a CPU:
#   SMOKE=1 bash training/gpu_emoji_teacher.sh   (2 steps on 64 images, float32)
set -euo pipefail
OUT=${OUT:-gpu-emoji}
STEPS=${STEPS:-20000}
BATCH=${BATCH:-256}
DATA=${DATA:-work/emoji/data}
BALANCE=${BALANCE-hexcode}
mkdir -p "$OUT"
[ -f "$DATA/train/metadata.jsonl" ] || { echo "no $DATA: run python -m ldm.data.emoji --out $DATA and carry it" >&2; exit 1; }
source bench/device_env.sh  # the carried wheels on PYTHONPATH, the Hub offline
extra=(--mixed_precision bf16 --allow_tf32 --dataloader_num_workers 4)
if [ -n "${SMOKE:-}" ]; then
  STEPS=2 BATCH=4 extra=(--mixed_precision no --max_train_samples 64)
fi
[ -z "$BALANCE" ] || extra+=(--balance_by "$BALANCE")
run=$(mktemp -d)/teacher
python3 training/train_t2i.py --pretrained_model_name_or_path models/emoji --train_data_dir "$DATA" --resolution 64 \
  --cache_latents --prediction_type v_prediction --rescale_betas_zero_snr --caption_dropout 0.1 --use_ema \
  --ema_decay 0.9999 --train_batch_size "$BATCH" --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 200 \
  --max_train_steps "$STEPS" --checkpointing_steps "$STEPS" --report_to none --output_dir "$run" "${extra[@]}" \
  2>&1 | tee "$OUT/train.log"
python3 - "$run" "$OUT/denoiser" <<'PY'
import sys
from ldm.components import load_pipeline_denoiser
load_pipeline_denoiser(sys.argv[1]).half().save_pretrained(sys.argv[2], max_shard_size="15MB")
PY
ls -la "$OUT/denoiser" | tee -a "$OUT/train.log"
