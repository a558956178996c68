#!/usr/bin/env bash
# images/test_images (1024x1024) -> images/test_images_downsample (32x32), all of them.
# Antialiased; existing outputs are kept, so a rerun only adds new ones.
#   bash images/downsample_images_for_test.sh
#   bash images/downsample_images_for_test.sh --num_workers 8 --filter lanczos
# The flags: images/seed_data.sh.
set -euo pipefail
exec bash "$(dirname "$0")/seed_data.sh" downsample test "$@"
