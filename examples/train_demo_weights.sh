#!/usr/bin/env bash
# Train the bundled demo weights from scratch on synthetic phantoms, then evaluate them
# on phantoms of another seed. These are the exact steps behind
# ichscan/weights/simplecnn_demo.pt (defaults below); not for clinical use.
#
#   examples/train_demo_weights.sh [WORK_DIR] [WEIGHTS_OUT]
#   STUDIES=100 SLICES=20 EPOCHS=5 examples/train_demo_weights.sh
set -euo pipefail
work=${1:-demo-training}
weights_out=${2:-ichscan/weights/simplecnn_demo.pt}
studies=${STUDIES:-100}
slices=${SLICES:-20}
epochs=${EPOCHS:-5}
eval_studies=${EVAL_STUDIES:-25}
ichscan=${ICHSCAN:-ichscan}
python=${PYTHON:-python3}

"$ichscan" synth "$work/train" --studies "$studies" --slices "$slices" --seed 1000 --layout rsna
"$ichscan" synth "$work/unseen" --studies "$eval_studies" --slices "$slices" --seed 777 --layout rsna
"$ichscan" train "$work/train" --labels "$work/train/stage_2_train.csv" --out "$work/run" --epochs "$epochs" --seed 0
"$ichscan" evaluate "$work/unseen" --labels "$work/unseen/stage_2_train.csv" --weights "$work/run/best.pt" --out "$work/eval"
mkdir -p "$(dirname "$weights_out")"
"$python" -c 'import sys; from ichscan.models import export_half; export_half(sys.argv[1], sys.argv[2])' "$work/run/best.pt" "$weights_out"
ls -l "$weights_out"
