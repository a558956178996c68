#!/usr/bin/env bash
# The README's "three minutes on one GPU" result (MINUTES=3), end to end: the default data set, preset default
# trained for $MINUTES minutes (default 5), then a 16 x 8 grid and the sample-quality table.
#   bash tools/five_minute_run.sh                      # writes into checkpoints/five_minutes/
#   MINUTES=30 RUN=checkpoints/half_hour bash tools/five_minute_run.sh --batch_size 460
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
MINUTES=${MINUTES:-5}
RUN=${RUN:-checkpoints/five_minutes}

bash images/make_default_dataset.sh
"$PY" train.py --max_minutes "$MINUTES" --model_checkpoint_dir "$RUN" --fresh --no_visdom --validate_every 5 "$@"
"$PY" generate.py --checkpoint "$RUN/latest_model.pth" --n 16 --m 8 --generated_image_save_dir "$RUN" --overwrite
if [ -f evaluate.py ]; then
    "$PY" evaluate.py --checkpoint "$RUN/latest_model.pth" --num_samples "${EVAL_SAMPLES:-10000}" \
        --output_json "$RUN/evaluation.json"
fi
