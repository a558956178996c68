#!/usr/bin/env bash
# The whole test suite: set-up (idempotent) and pytest. Extra arguments go to pytest,
# for example: bash test.sh -k resume
# Two pytest-xdist workers, one per core of the 2-core machines the suite is timed on; tests/conftest.py
# says which files stay on one worker and gives each worker its share of the threads. -n 0 runs
# everything in one process (for --pdb or -s), -n 4 on a larger machine.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec .venv/bin/python -m pytest tests -n 2 "$@"
