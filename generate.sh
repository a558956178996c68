#!/usr/bin/env bash
# Set-up, then an n x m grid from the latest checkpoint: generated/generated_images_{n}x{m}.png
# Before any training (no checkpoints/latest_model.pth), from the pretrained model in models/.
#   bash generate.sh                          # 8 columns x 4 rows, the checkpoint's own sampler
#   bash generate.sh --n 32 --m 8 --sampler ddpm --steps 1000 --overwrite
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec .venv/bin/python generate.py "$@"
