#!/usr/bin/env bash
# The seed's training images: 50,000 playground-v2.5 pictures of one prompt, 1024x1024, as
# images/train_images/{i}.png (--seed 0). Resumable: a rerun makes only the missing files.
#   bash images/generate_images_for_train.sh                      # one GPU
#   NPROC=4 bash images/generate_images_for_train.sh              # 4 GPUs (torchrun, one rank per GPU)
#   bash images/generate_images_for_train.sh --batch_size 4       # less GPU memory; any flag overrides
# Weights: models/README.md. Next step: bash images/downsample_images_for_train.sh
# The flags: images/seed_data.sh.
set -euo pipefail
exec bash "$(dirname "$0")/seed_data.sh" generate train "$@"
