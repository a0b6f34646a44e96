#!/usr/bin/env bash
# Several training runs side by side on one GPU machine (issue 15's experiments), each a plain
# `wsi-scan train` with its own recipe; the GPU is far from full with one small dense-exact
# network, so the runs share it and the CPU cores feed their loaders.
#
#   DATA=/tmp/data EPOCHS=40 OUTDIR=/tmp/runs scripts/gpu_train.sh
#   EPOCHS=auto CALIB=/tmp/calib.txt BUDGET_S=360 ...   # epochs that fit BUDGET_S, from a calibration
#   scripts/gpu_train.sh calibrate FOLDER               # one epoch of each run on FOLDER, writes CALIB
#
# DATA holds pcam-kaggle-sample, pcam-jpeg-sample (with valid/) and pcam-extra. The runs (name,
# then options) are listed in RUNS below; their models, logs and reports land in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${DATA:-../shared/data}
OUTDIR=${OUTDIR:-runs/gpu_train}
CALIB=${CALIB:-$OUTDIR/calib.txt}
NPROC=$(nproc)
DEVICE=${DEVICE:-cuda}
# progress bars in a log file: one line a minute is enough
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
# the p4m (rotation- and flip-equivariant) networks against plain ones of the same cost per cell;
# stronger stain jitter, measured on the CPU since (docs/model.md), gave nothing and was dropped
RUNS=(
  "p4m-w64-ema --arch dense-cnn-p4m --width 64 --ema-decay 0.999"
  "p4m-w48-ema --arch dense-cnn-p4m --width 48 --ema-decay 0.999"
  "w64-ema --width 64 --ema-decay 0.999"
  "w48-ema --width 48 --ema-decay 0.999"
)
N=${#RUNS[@]}
# loader workers per run: the cores less one main process per run
WORKERS=$(( (NPROC - N) / N > 1 ? (NPROC - N) / N : 1 ))
mkdir -p "$OUTDIR"

run_all() {  # $1 = epochs, $2.. = data folders and extra options for every run
  local epochs=$1; shift
  local pids=()
  # a timeout or Ctrl-C stops every run, not only this script
  trap 'kill "${pids[@]}" 2>/dev/null; exit 124' TERM INT
  for spec in "${RUNS[@]}"; do
    read -r name opts <<<"$spec"
    # shellcheck disable=SC2086
    $PY -m wsi_scan train "$@" --out "$OUTDIR/$name.safetensors" --report "$OUTDIR/report-$name" \
      --epochs "$epochs" --device "$DEVICE" --threads 1 --loader-workers "$WORKERS" --cache-patches --overwrite $opts \
      >"$OUTDIR/$name.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}

if [ "${1:-}" = calibrate ]; then
  # one epoch of every run at once on FOLDER (train and valid alike): seconds per patch per epoch
  t0=$(date +%s)
  run_all 1 "$2" --max-valid 256 --no-final-tta
  n=$($PY -c "import csv,sys; print(sum(1 for _ in csv.reader(open(sys.argv[1]))) - 1)" "$2/train_labels.csv")
  secs=$(grep -ho "([0-9.]* s)" "$OUTDIR"/*.log | tr -d '(s) ' | sort -n | tail -1)
  echo "calibration: $N runs, $n patches, slowest epoch $secs s, whole $(( $(date +%s) - t0 )) s"
  $PY -c "print(float('$secs') / $n)" >"$CALIB"
  exit 0
fi

EPOCHS=${EPOCHS:-40}
if [ "$EPOCHS" = auto ]; then
  # training plus validation patches per epoch, 25% margin, 90 s for start-up and the final TTA
  EPOCHS=$($PY -c "
per=float(open('$CALIB').read()); n=31081+2896
print(max(5, min(60, int(($BUDGET_S - 90) / (per * n * 1.25)))))")
fi
echo "== $N runs of $EPOCHS epochs, $WORKERS loader workers each"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
t0=$(date +%s)
run_all "$EPOCHS" "$DATA/pcam-kaggle-sample" "$DATA/pcam-jpeg-sample" "$DATA/pcam-extra"
rc=$?
echo "== done in $(( $(date +%s) - t0 )) s (rc $rc)"
for spec in "${RUNS[@]}"; do
  read -r name _ <<<"$spec"
  echo "-- $name"; grep -E "^epoch|AUC|Error|error" "$OUTDIR/$name.log" | tail -4
done
exit $rc
