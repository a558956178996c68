#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in parts that fit a short lease on a GPU machine:
#   bash tools/gpu_checks.sh OUT_DIR PART...     (PART: bench, tests, train, playground; in that order)
#   bench   bash bench.sh --profile --layouts forced contiguous (table, JSON, profiles); builds the data set meanwhile
#   tests   bash test.sh's GPU tests (pytest -m gpu)
#   train   tools/five_minute_run.sh (MINUTES, default 5): grid, loss curve, log and evaluation copied out
#   playground  images/bench_playground.py --profile on full-size random weights (BUDGET seconds, default 420)
# Run "bench" before "train" on the same machine: it leaves torch.compile's cache warm. Each part
# writes at most eight files into OUT_DIR; a part's output ends with the time it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(realpath -m "${1:?usage: bash tools/gpu_checks.sh OUT_DIR bench|tests|train|playground ...}")
shift
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1
for part in "$@"; do
    case "$part" in
    bench | tests | train | playground) ;;
    *) echo "error: part $part is unknown: choose bench, tests, train or playground" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
date -u +%FT%TZ

for part in "$@"; do
    case "$part" in
    bench)
        # The data set for "train", on the CPUs, at low priority, while the GPU is measured.
        nice -n 19 bash images/make_default_dataset.sh --num_workers 6 >"$OUT_DIR/dataset.log" 2>&1 &
        data=$!
        bash bench.sh --profile --layouts forced contiguous --out "$OUT_DIR"
        wait "$data"
        tail -c 300 "$OUT_DIR/dataset.log"
        ;;
    tests)
        "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -15 || echo "GPU TESTS FAILED"
        ;;
    train)
        RUN=checkpoints/five_minutes bash tools/five_minute_run.sh
        cp checkpoints/five_minutes/{generated_images_16x8.png,loss_curve.png,log.jsonl,evaluation.json} "$OUT_DIR/"
        ;;
    playground)
        "$PY" images/bench_playground.py --profile --time_budget "${BUDGET:-420}" --out "$OUT_DIR"
        ;;
    esac
    echo "$part done: $(date -u +%FT%TZ)"
done
