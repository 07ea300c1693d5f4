#!/bin/bash
# One device call: install the retention wheel (carried in .whl/), check correctness, benchmark.
#   bash benchmarks/gpu_run.sh [check] [bench] [extra bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import power_transformers.kernels.triton_power" || exit 1
what=$1; shift
if [[ $what == *check* ]]; then python3 benchmarks/check_gpu.py 2>&1 | tee "$OUT/check.log"; fi
if [[ $what == *bench* ]]; then python3 benchmarks/bench_attention.py --out "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log"; fi
