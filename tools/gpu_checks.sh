#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in parts that fit a short lease on a GPU machine:
#   bash tools/gpu_checks.sh OUT_DIR PART...
#   data    builds the default data set (about 40 s on 16 cores), in the background; the parts that need it wait
#   train   tools/five_minute_run.sh (MINUTES, default 3; EVAL_SAMPLES, default 5000) with an empty compile
#           cache, so --compile auto decides as it would on a new machine: grid, loss curve, log, evaluation
#   compile tools/run_costs.py compile: time to the first 50 steps, eager / whole / regional, cold and warm cache
#   concurrency  tools/run_costs.py concurrency: runs per GPU-hour with 1 to 4 runs at once (KIMG, default 100)
#   bench   bash bench.sh --profile --layouts forced contiguous --loop_minutes LOOP_MINUTES (default 3)
#   tests   bash test.sh's GPU tests (pytest -m gpu)
#   playground  images/bench_playground.py --profile on full-size random weights (BUDGET seconds, default 420)
# One 15-minute GPU window fits "data train compile"; the others need another. Each part writes its
# files into OUT_DIR; a part's output ends with the time it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(realpath -m "${1:?usage: bash tools/gpu_checks.sh OUT_DIR PART... (see above)}")
shift
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1
for part in "$@"; do
    case "$part" in
    data | train | compile | concurrency | bench | tests | playground) ;;
    *) echo "error: part $part is unknown: choose data, train, compile, concurrency, bench, tests or playground" >&2
       exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
date -u +%FT%TZ

data=""
need_data() {
    if [ -n "$data" ]; then wait "$data"; data=""; tail -c 300 "$OUT_DIR/dataset.log"; fi
}
for part in "$@"; do
    case "$part" in
    data)
        nice -n 19 bash images/make_default_dataset.sh --num_workers 12 >"$OUT_DIR/dataset.log" 2>&1 &
        data=$!
        ;;
    compile | concurrency)
        need_data
        "$PY" tools/run_costs.py "$part" --out "$OUT_DIR/run_costs" --kimg "${KIMG:-100}"
        rm -rf "$OUT_DIR"/run_costs/{compile,concurrent}_*/*.pth
        ;;
    bench)
        need_data
        bash bench.sh --profile --layouts forced contiguous --loop_minutes "${LOOP_MINUTES:-3}" --out "$OUT_DIR"
        rm -f "$OUT_DIR"/loop_run/*.pth
        ;;
    tests)
        "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -15 || echo "GPU TESTS FAILED"
        ;;
    train)
        need_data
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) MINUTES=${MINUTES:-3} \
            EVAL_SAMPLES=${EVAL_SAMPLES:-5000} RUN=checkpoints/five_minutes bash tools/five_minute_run.sh
        cp checkpoints/five_minutes/{generated_images_16x8.png,loss_curve.png,log.jsonl,evaluation.json} "$OUT_DIR/"
        ;;
    playground)
        "$PY" images/bench_playground.py --profile --time_budget "${BUDGET:-420}" --out "$OUT_DIR"
        ;;
    esac
    echo "$part done: $(date -u +%FT%TZ)"
done
