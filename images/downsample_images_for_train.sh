#!/usr/bin/env bash
# images/train_images (1024x1024) -> images/train_images_downsample (32x32), all of them (the seed
# kept only a subset here). Antialiased; existing outputs are kept, so a rerun only adds new ones.
#   bash images/downsample_images_for_train.sh
#   bash images/downsample_images_for_train.sh --num_workers 8 --filter lanczos
# The flags: images/seed_data.sh.
set -euo pipefail
exec bash "$(dirname "$0")/seed_data.sh" downsample train "$@"
