#!/usr/bin/env bash
# The GPU check for a lent accelerator (the `device` tool), from the repo root:
#   1. wheels: the device image has torch, transformers, accelerate and peft but not diffusers or datasets, so
#      download them here first (see /work/.library/device/README.md), into .whl/ (git-ignored), and carry .whl;
#   2. bench/gpu_check.py: bf16 GEMM peak, bf16 training images/s and MFU of DiT-B/2 and unet-b at 256 px,
#      SDPA vs xformers, the pipeline in fp16/bf16 with and without enable_model_cpu_offload;
#   3. accelerate on one GPU with tiny components: under FSDP, train_t2i.py must refuse with its message (it reads
#      whole weights: EMA, sync check, validation, final save); without it, 4 bf16 steps with EMA must train and save.
# Output: a log and the JSON line in $OUT (or ./gpu-check when $OUT is unset). Smoke-test on a CPU with --smoke.
set -euo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
source bench/device_env.sh  # the carried wheels on PYTHONPATH, the Hub offline
python3 bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
tmp=$(mktemp -d)
python3 - "$tmp" <<'PY'
import sys
from ldm.tiny import tiny_pipeline
tiny_pipeline("dit").save_pretrained(sys.argv[1] + "/base")
import json, pathlib
pathlib.Path(sys.argv[1], "dit.json").write_text(json.dumps({"patch_size": 2, "hidden_size": 64, "depth": 2,
                                                            "num_attention_heads": 2}))
PY
python3 - "$tmp" <<'PY'
import io, json, sys, pathlib
import numpy as np
from PIL import Image
root = pathlib.Path(sys.argv[1], "data"); root.mkdir()
with open(root / "metadata.jsonl", "w") as f:
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        f.write(json.dumps({"file_name": f"{i}.png", "text": f"a red square {i}"}) + "\n")
PY
train=(training/train_t2i.py --pretrained_model_name_or_path "$tmp/base" --denoiser dit --denoiser_config
  "$tmp/dit.json" --train_data_dir "$tmp/data" --resolution 32 --train_batch_size 4 --max_train_steps 4
  --checkpointing_steps 2 --use_ema --report_to none)
if accelerate launch --use_fsdp --num_processes 1 --mixed_precision bf16 "${train[@]}" --output_dir "$tmp/fsdp" \
    > "$OUT/fsdp.log" 2>&1; then
  echo "fsdp: trained (the refusal did not trigger)" | tee -a "$OUT/fsdp.log"
elif grep -q "FSDP shards the model's parameters" "$OUT/fsdp.log"; then
  echo "fsdp: refused with its message" | tee -a "$OUT/fsdp.log"
else
  tail -20 "$OUT/fsdp.log"; echo "fsdp: failed without the refusal message" >&2; exit 1
fi
accelerate launch --num_processes 1 --mixed_precision bf16 "${train[@]}" --output_dir "$tmp/plain" > "$OUT/train.log" 2>&1 \
  || { tail -20 "$OUT/train.log"; exit 1; }
ls "$tmp/plain" | tee -a "$OUT/train.log"
