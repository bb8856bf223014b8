#!/usr/bin/env bash
# Train the bundled ichnet demo weights from scratch on synthetic phantoms of every style
# (each style as volumetric series and as independent slices), then evaluate them on
# phantoms of other seeds. These are the exact steps behind ichscan/weights/ichnet_demo.pt
# (defaults below); not for clinical use.
#
#   examples/train_ichnet_weights.sh [WORK_DIR] [WEIGHTS_OUT]
#   STUDIES=17 SLICES=20 examples/train_ichnet_weights.sh     # 6 sets x 17 x 20 = 2,040 slices
set -euo pipefail
work=${1:-ichnet-training}
weights_out=${2:-ichscan/weights/ichnet_demo.pt}
studies=${STUDIES:-17}
slices=${SLICES:-20}
eval_studies=${EVAL_STUDIES:-4}
model=${MODEL:-ichnet}
ichscan=${ICHSCAN:-ichscan}
python=${PYTHON:-python3}
styles=(default small-faint sharp-large)

# One folder per style and mode; training reads them all (ID_*.dcm are found recursively)
# with one label file, the concatenation of theirs.
seed=2000
for style in "${styles[@]}"; do
  for mode in volumetric slices; do
    flag=$([ "$mode" = volumetric ] && echo --volumetric || true)
    "$ichscan" synth "$work/train/$style-$mode" --studies "$studies" --slices "$slices" --seed "$seed" --layout rsna --style "$style" $flag
    "$ichscan" synth "$work/unseen/$style-$mode" --studies "$eval_studies" --slices "$slices" --seed $((seed + 500)) --layout rsna --style "$style" $flag
    seed=$((seed + 1))
  done
done
for set in train unseen; do
  first=1
  for csv in "$work/$set"/*/stage_2_train.csv; do
    if [ $first = 1 ]; then cat "$csv"; first=0; else tail -n +2 "$csv"; fi
  done > "$work/$set/labels.csv"
done
started=$SECONDS
"$ichscan" train "$work/train" --labels "$work/train/labels.csv" --out "$work/run" --model "$model" --seed 0 --no-progress
echo "ichscan train: $((SECONDS - started)) s"
"$ichscan" evaluate "$work/unseen" --labels "$work/unseen/labels.csv" --weights "$work/run/best.pt" --out "$work/eval"
for style in "${styles[@]}"; do  # each style on its own (volumetric series: the study AUC means most there)
  "$ichscan" evaluate "$work/unseen/$style-volumetric" --labels "$work/unseen/$style-volumetric/stage_2_train.csv" \
    --weights "$work/run/best.pt" --out "$work/eval-$style-volumetric"
done
mkdir -p "$(dirname "$weights_out")"
"$python" -c 'import sys; from ichscan.models import export_half; export_half(sys.argv[1], sys.argv[2])' "$work/run/best.pt" "$weights_out"
ls -l "$weights_out"
