#!/usr/bin/env bash
# Training and sampling throughput on one CUDA GPU (see bench.py); writes generated/bench/bench.{json,md}.
# bash bench.sh --device cpu: the CPU's table instead, written to docs/bench_cpu.md.
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" bench.py "$@"
