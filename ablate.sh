#!/usr/bin/env bash
# The ablation study (ablate.py): set-up, the default data set (resumable: seconds when it is
# complete), then ablate.py with every argument passed through.
#   bash ablate.sh                                   # the study on this machine's GPU; reruns skip finished runs
#   bash ablate.sh --group baseline --seeds 0,1,2    # one chunk
#   bash ablate.sh --gpus 0,1,2,3                    # one worker per GPU
#   bash ablate.sh --scale cpu                       # the CPU study (preset small); --scale toy: the toy one
#   bash ablate.sh curve                             # the budget curve
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
case " $* " in
    *" --train_dataset_directory"* | *" --validate_dataset_directory"*) ;;
    *) bash images/make_default_dataset.sh ;;
esac
PY=.venv/bin/python
exec "$PY" ablate.py "$@"
