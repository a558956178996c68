#!/usr/bin/env bash
# Builds the default data set: DiceBear `adventurer` avatars at 32x32 (see images/avatars.py).
# Train uses seeds 0.., test seeds 1000000.., so the two sets never share an avatar.
# Each folder also gets labels.csv, the DiceBear attributes of every image (see avatars.py).
# Resumable: a rerun only renders the files that are missing, and adds labels.csv to a folder built
# before labels existed. While a folder is being built it holds a file .building, so train_UNet.sh
# knows to finish an interrupted build.
#   bash images/make_default_dataset.sh
#   NUM_TRAIN=1000 NUM_TEST=100 bash images/make_default_dataset.sh --num_workers 4
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

build() {  # build DIR NUM FIRST_INDEX [args]
    local dir=$1 num=$2 first=$3
    shift 3
    mkdir -p "$dir"
    touch "$dir/.building"
    "$PY" images/avatars.py --dest_image_dir "$dir" --num_samples "$num" --first_index "$first" "$@"
    rm -f "$dir/.building"
}
build images/train_images_downsample "${NUM_TRAIN:-50000}" 0 "$@"
build images/test_images_downsample "${NUM_TEST:-5000}" 1000000 "$@"
