#!/usr/bin/env bash
# The test images: 5,000 playground-v2.5 pictures of one prompt, 1024x1024, as
# images/test_images/{i}.png. --seed 1 (train: 0), so no test image starts from a training
# image's noise. Resumable: a rerun makes only the missing files.
#   bash images/generate_images_for_test.sh                      # one GPU
#   NPROC=4 bash images/generate_images_for_test.sh              # 4 GPUs (torchrun, one rank per GPU)
#   bash images/generate_images_for_test.sh --batch_size 4       # less GPU memory; any flag overrides
# Weights: models/README.md. Next step: bash images/downsample_images_for_test.sh
# The flags: images/seed_data.sh.
set -euo pipefail
exec bash "$(dirname "$0")/seed_data.sh" generate test "$@"
