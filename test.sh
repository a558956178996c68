#!/usr/bin/env bash
# The whole test suite: set-up (idempotent) and pytest. Extra arguments go to pytest,
# for example: bash test.sh -k resume
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec .venv/bin/python -m pytest tests "$@"
