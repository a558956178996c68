#!/usr/bin/env bash
# images/test_images (1024x1024) -> images/test_images_downsample (32x32), all of them.
# Antialiased; existing outputs are kept, so a rerun only adds new ones.
#   bash images/downsample_images_for_test.sh
#   bash images/downsample_images_for_test.sh --num_workers 8 --filter lanczos
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

exec "$PY" images/downsample.py \
    --source_image_dir images/test_images \
    --dest_image_dir images/test_images_downsample \
    --dest_image_height 32 \
    --dest_image_width 32 \
    --num_samples -1 \
    --skip_exists True \
    "$@"
