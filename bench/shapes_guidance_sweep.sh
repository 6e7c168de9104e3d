#!/bin/sh
# The bundled shapes models on the 96 held-out prompts with the strict analyser, over guidance scales
# (about 25 min on 2 cores; figures in models/EVALUATION.json and the README). Run from the repository root.
mkdir -p work/shapes-eval
for model in shapes-teacher shapes-student; do
  for g in 1 2 3 4 5.5 7.5 10; do
    steps=50; [ $model = shapes-student ] && steps=4
    OMP_NUM_THREADS=1 .venv/bin/python training/evaluate.py --model models/$model --split heldout --num_prompts 96 \
      --steps $steps --guidance_scale $g --threads 1 --output work/shapes-eval/$model-g$g.png > work/shapes-eval/$model-g$g.log 2>&1
  done
done
