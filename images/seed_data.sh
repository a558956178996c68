#!/usr/bin/env bash
# The seed's data path for its train or test set (the four images/*_for_{train,test}.sh call this):
#   generate:   playground-v2.5 pictures of one prompt, 1024x1024, as images/<split>_images/{i}.png
#               (images/generate_image.py; weights: models/README.md). Resumable: a rerun makes only
#               the missing files. train: 50,000 with --seed 0; test: 5,000 with --seed 1, so no test
#               image starts from a training image's noise.
#   downsample: images/<split>_images -> images/<split>_images_downsample (32x32), all of them, antialiased
#               (images/downsample.py). Existing outputs are kept, so a rerun only adds new ones.
#
#   bash images/seed_data.sh generate train                      # one GPU
#   NPROC=4 bash images/seed_data.sh generate train              # 4 GPUs (torchrun, one rank per GPU)
#   bash images/seed_data.sh generate test --batch_size 4        # any flag overrides
#   bash images/seed_data.sh downsample train --num_workers 8 --filter lanczos
# PY=/path/to/python picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash images/seed_data.sh generate|downsample train|test [flags for the script]"
if [ $# -lt 2 ]; then echo "error: $usage" >&2; exit 2; fi
step=$1 split=$2
shift 2
case $split in
    train) num_samples=50000 seed=0 ;;
    test) num_samples=5000 seed=1 ;;
    *) echo "error: the set is train or test, not '$split'; $usage" >&2; exit 2 ;;
esac

default_py=python3
if [ -x .venv/bin/python ]; then default_py=.venv/bin/python; fi
PY=${PY:-$default_py}

case $step in
    generate)
        run=("$PY")
        if [ "${NPROC:-1}" -gt 1 ]; then run=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC"); fi
        exec "${run[@]}" images/generate_image.py \
            --num_samples "$num_samples" \
            --image_save_dir "images/${split}_images" \
            --prompt "anime-style avatar, totally white background" \
            --model_name playgroundai/playground-v2.5-1024px-aesthetic \
            --variant fp16 \
            --num_inference_steps 50 \
            --guidance_scale 3 \
            --device cuda \
            --seed "$seed" \
            "$@"
        ;;
    downsample)
        exec "$PY" images/downsample.py \
            --source_image_dir "images/${split}_images" \
            --dest_image_dir "images/${split}_images_downsample" \
            --dest_image_height 32 \
            --dest_image_width 32 \
            --num_samples -1 \
            --skip_exists True \
            "$@"
        ;;
    *) echo "error: the step is generate or downsample, not '$step'; $usage" >&2; exit 2 ;;
esac
