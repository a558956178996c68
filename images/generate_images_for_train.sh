#!/usr/bin/env bash
# The seed's training images: 50,000 playground-v2.5 pictures of one prompt, 1024x1024, as
# images/train_images/{i}.png. Resumable: a rerun makes only the missing files.
#   bash images/generate_images_for_train.sh                      # one GPU
#   NPROC=4 bash images/generate_images_for_train.sh              # 4 GPUs (torchrun, one rank per GPU)
#   bash images/generate_images_for_train.sh --batch_size 4       # less GPU memory; any flag overrides
# Weights: models/README.md. Next step: bash images/downsample_images_for_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
run=("$PY")
if [ "${NPROC:-1}" -gt 1 ]; then run=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC"); fi

exec "${run[@]}" images/generate_image.py \
    --num_samples 50000 \
    --image_save_dir images/train_images \
    --prompt "anime-style avatar, totally white background" \
    --model_name playgroundai/playground-v2.5-1024px-aesthetic \
    --variant fp16 \
    --num_inference_steps 50 \
    --guidance_scale 3 \
    --device cuda \
    --seed 0 \
    "$@"
