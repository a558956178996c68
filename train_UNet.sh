#!/usr/bin/env bash
# Set-up, the default data set when it is missing, a visdom server, then training.
#   bash train_UNet.sh                                  # preset default on the default data set
#   bash train_UNet.sh --preset seed --batch_size 230   # any train.py flag passes through
# Open http://localhost:8097 to watch the loss curves (--no_visdom: no server, no plots).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh

port=8097
custom_data=0
visdom=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --no_visdom) visdom=0 ;;
        --visdom_port) port=${args[i + 1]:-8097} ;;
        --visdom_port=*) port=${args[i]#*=} ;;
        --train_dataset_directory* | --validate_dataset_directory*) custom_data=1 ;;
    esac
done

# The default data set, when the seed's folders are missing or an earlier build was interrupted.
if [ "$custom_data" = 0 ]; then
    for dir in images/train_images_downsample images/test_images_downsample; do
        if [ ! -d "$dir" ] || [ -e "$dir/.building" ]; then
            echo "train_UNet.sh: building the default data set (DiceBear avatars) into images/"
            bash images/make_default_dataset.sh
            break
        fi
    done
fi

if [ "$visdom" = 1 ]; then
    bash tools/start_visdom.sh "$port" || echo "train_UNet.sh: no visdom server; training goes on without live plots"
fi

exec .venv/bin/python train.py "$@"
