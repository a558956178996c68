#!/usr/bin/env bash
# Sample an n x m grid from the latest checkpoint: generated/generated_images_{n}x{m}.png
#   bash generate.sh                          # 8 columns x 4 rows, the checkpoint's own sampler
#   bash generate.sh --n 32 --m 8 --sampler ddpm --steps 1000 --overwrite
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" generate.py "$@"
