#!/usr/bin/env bash
# One whole GPU run in one call: environment record, the CUDA parity tests, the benchmark suite.
# Writes under $OUT (default ./out): info.json, tests.log, tests.xml, bench.json, bench.log, table.md.
#
# On the lent GPU machine (offline; torch/triton/timm/pytest-benchmark preinstalled), from the repo root:
#   bash benchmarks/gpu_run.sh
# Optional wheels that travel with the tree (e.g. xformers) are installed first when .whl/ exists.
# Then commit the result with:  python benchmarks/render.py --save out/ benchmarks/results/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET                      # real kernels on the GPU
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"    # run from the source tree (lafs_fast maps kernels/ itself)

python3 -m lafs_fast.cli info --json > "$OUT/info.json" 2> "$OUT/info.err" || cat "$OUT/info.err"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
echo "$(date -u +%FT%TZ) bash benchmarks/gpu_run.sh" > "$OUT/command.txt"

# 1. parity: the whole test suite on this machine (CUDA cases run, CPU cases too), stop on nothing
python3 -m pytest tests -q -p no:cacheprovider -o timeout=0 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

# 2. the benchmark suite, side by side per group
python3 -m pytest benchmarks -q -p no:cacheprovider -o timeout=0 --benchmark-json="$OUT/bench.json" \
  --benchmark-min-rounds=5 --benchmark-max-time=2 2>&1 | tee "$OUT/bench.log" | tail -60
bench_rc=${PIPESTATUS[0]}

python3 benchmarks/render.py "$OUT/bench.json" > "$OUT/table.md" && cat "$OUT/table.md"
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
