#!/usr/bin/env bash
# Train on a GPU machine lent through the device tool, from a training pack, and bring the models back.
#   here:  .venv/bin/python -m training.pack --config training/configs/v8.yaml --out .pack/data.zip
#          bash scripts/device_wheels.sh
#   there: bash scripts/device_train.sh training/configs/gpu-heldout.yaml training/configs/gpu-final.yaml
#          (carry .pack and .whl; about 4.5 minutes a config)
# For each config, $OUT gets the fp16 export in parts of at most 15 MiB (<name>.safetensors.part-aa, -ab;
# `cat` them together) and <name>-run.tar.gz: the run folder without checkpoints (training log, metrics,
# split, sampling) and a GPU utilisation trace. NUCSEG_WHEELS=0 skips installing .whl (a dry run here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if [ "${NUCSEG_WHEELS:-1}" = 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
for config in "$@"; do
  name=$(basename "$config" .yaml)
  run_dir=$("$PYTHON" -c "import sys; from training.config import load_config; print(load_config(sys.argv[1]).out_dir)" "$config")
  mkdir -p "$run_dir"
  util=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used --format=csv -l 5 > "$run_dir/gpu.csv" &
    util=$!
  fi
  start=$(date +%s)
  "$PYTHON" -m training.train --config "$config" --pack .pack/data.zip --fresh > "$run_dir/train.log" 2>&1 \
    || { tail -n 40 "$run_dir/train.log"; exit 1; }
  [ -z "$util" ] || kill "$util"
  tail -n 3 "$run_dir/train.log"
  echo "$name: $(( $(date +%s) - start )) s"
  "$PYTHON" -m training.export --checkpoint "$run_dir/last.pt" --out "$run_dir/$name.safetensors"
  split -b 15M "$run_dir/$name.safetensors" "$OUT/$name.safetensors.part-"
  tar czf "$OUT/$name-run.tar.gz" -C "$run_dir" --exclude '*.pt' --exclude '*.safetensors' .
done
ls -l "$OUT"
