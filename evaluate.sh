#!/usr/bin/env bash
# Sample quality against the train set, each number beside its floor (test set vs train set).
#   bash evaluate.sh --checkpoint checkpoints/latest_model.pth              # generates 10,000 images first
#   bash evaluate.sh --image_dir my_samples --output_json eval.json
# Paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
exec "$PYTHON" evaluate.py "$@"
