#!/usr/bin/env bash
# How the GPU numbers are taken (on the device machine, from the repo root, with the wheels of
# ../shared/tools/device-wheels.sh carried in .whl/). Usage: bash benchmarks/device_run.sh STAGE...
#   tests   the GPU tests (pytest -m gpu)          kernels  the kernel microbenchmarks
#   dense   train_step.py on the dense workload for every setup, profile of one step each
#   train   train_step.py on $WORKLOADS (comma-separated, default qlora,moe,moe-big) for $SETUPS
#   compile the cold first step of fxopt on $WORKLOADS (default dense,qlora): each run with empty Inductor and
#           Triton caches; PROFILE_COMPILE=1: the first step under cProfile (train_step.py --profile-compile: where the time goes; slower);
#           SERIAL=1: also with compile_threads=0 (the fxopt_serial setups), alternating, for what precompile saves
# Everything is written under $OUT (or benchmarks/results when OUT is unset).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
for stage in "$@"; do
  case $stage in
    tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -m gpu -q -s -p no:cacheprovider -p no:logging --tb=short --durations=25 ${TESTS:-tests} 2>&1 | grep -v "^DEBUG" | tail -150 > "$OUT/gpu-tests.txt" ;;
    kernels) for b in ${BENCHES:-benchmarks/bench_*.py}; do python3 "$b" --out "$OUT" 2>&1 | tail -40 > "$OUT/$(basename "$b" .py).txt"; done ;;
    dense) python3 benchmarks/train_step.py --workloads dense --setups "${SETUPS:-eager,compile,liger,fxopt}" \
             --out "$OUT" --profile "$OUT/profiles" --timeout 400 2>&1 | tail -30 > "$OUT/train-dense.txt" ;;
    train) python3 benchmarks/train_step.py --workloads "${WORKLOADS:-qlora,moe,moe-big}" \
             --setups "${SETUPS:-eager,compile,liger,fxopt}" --out "$OUT" --tag "${TAG:-train}" \
             --timeout "${TRAIN_TIMEOUT:-400}" 2>&1 | tail -40 > "$OUT/train-${TAG:-train}.txt" ;;
    compile) for wl in $(echo "${WORKLOADS:-dense,qlora}" | tr , ' '); do
               base=fxopt; [ "$wl" = qlora ] && base=fxopt_compute_dtype
               for setup in $base ${SERIAL:+${base}_serial}; do
                 d=/tmp/cold-$wl-$setup
                 rm -rf "$d"; TRITON_CACHE_DIR=$d/triton TORCHINDUCTOR_CACHE_DIR=$d/inductor \
                   python3 benchmarks/train_step.py --workloads "$wl" --setups "$setup" --out "$OUT" \
                   --tag "cold-$wl-$setup" ${PROFILE_COMPILE:+--profile-compile "$OUT"} \
                   --timeout "${TRAIN_TIMEOUT:-400}" 2>&1 | tail -20 > "$OUT/compile-$wl-$setup.txt"
               done
             done ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
