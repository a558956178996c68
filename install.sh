#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv, the requirements, and visdom's front-end
# files (from the npm registry, so the visdom server works offline).
#   bash install.sh                                   # CPU or the default CUDA build of torch
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash install.sh
# A second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13), sys.version' 2>/dev/null || {
        echo "install.sh: $("$PYTHON" --version 2>&1) is not supported: use Python 3.10 to 3.13 (PYTHON=python3.12 bash install.sh)" >&2
        exit 1
    }
    echo "install.sh: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python

# The stamp records what was installed; when nothing changed there is nothing to do.
# (hashed by Python rather than sha256sum, which macOS lacks)
want=$("$PY" -c 'import hashlib, os, sys
h = hashlib.sha256()
for name in sys.argv[1:]:
    if os.path.exists(name):
        h.update(open(name, "rb").read())
print(h.hexdigest())' requirements.txt tools/visdom_assets.py)-${TORCH_INDEX_URL:-default}
stamp=$VENV/.installed
# (find_spec, not import: importing torch and diffusers alone takes about 4 s)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import importlib.util, sys
sys.exit(any(importlib.util.find_spec(name) is None for name in ("torch", "diffusers", "visdom", "xdist")))' 2>/dev/null; then
    echo "install.sh: $VENV is up to date"
    exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
# visdom's sdist needs pkg_resources to build, which setuptools 81 removed.
pip_install -q --upgrade pip 'setuptools<81' wheel
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_install torch torchvision --index-url "$TORCH_INDEX_URL"
fi
pip_install --no-build-isolation -r requirements.txt
if [ -f tools/visdom_assets.py ]; then
    "$PY" tools/visdom_assets.py
fi
echo "$want" > "$stamp"
echo "install.sh: done; activate with: source $VENV/bin/activate"
