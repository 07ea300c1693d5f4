#!/bin/bash
# One device call: install the retention wheel (carried in .whl/), check correctness, pick the
# fastest kernel configuration, benchmark with it.
#   bash benchmarks/gpu_run.sh [check][,profile][,bench] [extra bench args...]
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
if [[ $what == *check* ]]; then python3 benchmarks/check_gpu.py ${CHECK_ARGS:-} 2>&1 | tee "$OUT/check.log"; fi
# the chunk the model runs at the benchmark's shape (d = 64, one query head a key/value head)
chunks=$(python3 -c "from power_transformers.kernels.triton_chunk import default_chunk; print(default_chunk(64, 1))")
if [[ $what == *profile* ]]; then
  python3 benchmarks/profile_kernels.py 65536 ${PROFILE_CHUNKS:-128,64} 2>&1 | grep -v -i warn | tee "$OUT/profile.log"
  best=$(grep '^BEST' "$OUT/profile.log")
  if [[ -n $best ]]; then
    chunks=$(echo "$best" | sed 's/.*C=\([0-9]*\).*/\1/')
  fi
fi
echo "bench with chunk $chunks"
if [[ $what == *bench* ]]; then python3 benchmarks/bench_attention.py --chunks "$chunks" --out "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log"; fi
