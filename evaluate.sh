#!/usr/bin/env bash
# Sample quality against the train set, each number beside its floor (test set vs train set).
#   bash evaluate.sh --checkpoint checkpoints/latest_model.pth              # generates 10,000 images first
#   bash evaluate.sh --image_dir my_samples --output_json eval.json
# Paths are relative to the repository root.
# Without --checkpoint or --image_dir: checkpoints/latest_model.pth, or before any training the
# pretrained model in models/. Set-up first, as every script here does.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
case " $* " in  # the default real images, unless both folders are given (seconds when they are complete)
    *" --reference_dir"*" --test_dir"* | *" --test_dir"*" --reference_dir"* | *" -h "* | *" --help "*) ;;
    *) bash images/make_default_dataset.sh ;;
esac
exec .venv/bin/python evaluate.py "$@"
