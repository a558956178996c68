#!/usr/bin/env bash
# Every check that needs a CUDA GPU, for a short lease on a GPU machine, in two parts:
#   bash tools/gpu_checks.sh OUT_DIR bench    # bench.sh --profile, then the GPU tests; builds the data set meanwhile
#   bash tools/gpu_checks.sh OUT_DIR train    # tools/five_minute_run.sh (MINUTES, default 5), results copied out
# Each part writes at most eight files into OUT_DIR. Run "bench" first: it leaves torch.compile's
# cache warm for "train".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(realpath -m "${1:?usage: bash tools/gpu_checks.sh OUT_DIR bench|train}")
PART=${2:?usage: bash tools/gpu_checks.sh OUT_DIR bench|train}
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u +%FT%TZ

case "$PART" in
bench)
    # The data set for "train", on the CPUs, at low priority, while the GPU is measured.
    nice -n 19 bash images/make_default_dataset.sh --num_workers 6 >"$OUT_DIR/dataset.log" 2>&1 &
    data=$!
    bash bench.sh --profile --out "$OUT_DIR"
    "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -15 || echo "GPU TESTS FAILED"
    wait "$data"
    tail -3 "$OUT_DIR/dataset.log"
    ;;
train)
    RUN=checkpoints/five_minutes bash tools/five_minute_run.sh
    cp checkpoints/five_minutes/{generated_images_16x8.png,loss_curve.png,log.jsonl,evaluation.json} "$OUT_DIR/"
    ;;
*)
    echo "error: part $PART is unknown: choose bench or train" >&2
    exit 2
    ;;
esac
date -u +%FT%TZ
