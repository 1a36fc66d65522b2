#!/usr/bin/env bash
# The CPU benchmark run behind the README's CPU table: the suite with JSON, the environment record,
# then the results stored under benchmarks/results/ and rendered.
#   bash benchmarks/cpu_run.sh            (from the repo root, with the .venv of the README)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/cpu-bench}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # CPU cases only; the Triton cases need CUDA and skip
"$PY" -m lafs_fast.cli info --json > "$OUT/info.json"
echo "$(date -u +%FT%TZ) bash benchmarks/cpu_run.sh" > "$OUT/command.txt"
"$PY" -m pytest benchmarks -q -p no:cacheprovider -o timeout=0 --benchmark-json="$OUT/bench.json" \
  --benchmark-min-rounds=3 --benchmark-max-time=1 2>&1 | tail -3
saved=$("$PY" benchmarks/render.py --save "$OUT" benchmarks/results)
"$PY" benchmarks/render.py "$saved"
