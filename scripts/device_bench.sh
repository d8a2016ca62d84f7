#!/usr/bin/env bash
# The engine's GPU benchmarks on a machine lent through the device tool, in one call.
#   here:  bash scripts/device_wheels.sh && make samples
#   there: OUT=$OUT bash scripts/device_bench.sh        (carry .whl and .cache/samples; timeout about 560 s)
# Runs, with the shipped model: the whole-slide benchmark on a generated 32,768² px 40x pyramid of real
# tissue (JPEG tiles; every output; GPU utilisation sampled), at the device's default batch and at
# batch 32, then the engine benchmark on a 4096² region of the CMU sample (parity and fastest
# defaults against the bare forward). Each command's output goes to $OUT/<name>.log, with the GPU's
# own trace in $OUT/gpu.csv. A command is skipped when the one before it says it would not end within
# BUDGET seconds of the start (500). SIDE (32768), REGION (4096), DEVICE (cuda) and NUCSEG_WHEELS=0
# (skip installing .whl) make a dry run here:
#   NUCSEG_WHEELS=0 PYTHON=.venv/bin/python DEVICE=cpu SIDE=2048 REGION=1024 bash scripts/device_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-out}
SIDE=${SIDE:-32768}
REGION=${REGION:-4096}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-500}
mkdir -p "$OUT"
if [ "${NUCSEG_WHEELS:-1}" = 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu.csv" &
  trace=$!
  trap 'kill $trace' EXIT
fi
last=0
run() {  # name, then the command's arguments; skipped if the last command's time would overrun BUDGET
  local name=$1; shift
  if (( SECONDS + last > BUDGET )); then
    echo "== $name: skipped ($SECONDS s gone, the last command took $last s, budget $BUDGET s)"
    return
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$PYTHON" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  last=$(( SECONDS - start ))
  tail -n 4 "$OUT/$name.log"
  echo "== $name: exit $rc, $last s"
}
model=model/weights/nucseg-default.safetensors
run slide -m benchmarks.slide --device "$DEVICE" --side "$SIDE" --model "$model"
run slide-batch32 -m benchmarks.slide --device "$DEVICE" --side "$SIDE" --model "$model" --batch 32
run engine -m benchmarks.engine --device "$DEVICE" --region "$REGION" --model "$model" --skip-baselines \
  --fast-tiles 256,512 --memory-sides ""
ls -l "$OUT"
