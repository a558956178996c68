#!/usr/bin/env bash
# The test images: 5,000 playground-v2.5 pictures of one prompt, 1024x1024, as
# images/test_images/{i}.png. --seed 1 (train: 0), so no test image starts from a training
# image's noise. Resumable: a rerun makes only the missing files.
#   bash images/generate_images_for_test.sh                      # one GPU
#   NPROC=4 bash images/generate_images_for_test.sh              # 4 GPUs (torchrun, one rank per GPU)
#   bash images/generate_images_for_test.sh --batch_size 4       # less GPU memory; any flag overrides
# Weights: models/README.md. Next step: bash images/downsample_images_for_test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
run=("$PY")
if [ "${NPROC:-1}" -gt 1 ]; then run=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC"); fi

exec "${run[@]}" images/generate_image.py \
    --num_samples 5000 \
    --image_save_dir images/test_images \
    --prompt "anime-style avatar, totally white background" \
    --model_name playgroundai/playground-v2.5-1024px-aesthetic \
    --variant fp16 \
    --num_inference_steps 50 \
    --guidance_scale 3 \
    --device cuda \
    --seed 1 \
    "$@"
