#!/usr/bin/env bash
# The staged, time-boxed GPU check, made for ONE call: the lent machine is given back about 30 s
# after a call, so a second call most likely starts a cold machine. Stages in order of value, each
# under `timeout` and inside one global deadline (BUDGET_S, default 540 for a call timeout of 590),
# each leaving its line in $OUT/results.jsonl and its figures merged into $OUT/bench.json at once,
# so a call that is cut still returns what it measured. docs/gpu.md says how to run, read and commit it.
#
#   COMMIT=<40 hex> bash benchmarks/gpu_run.sh                  # the one call (docs/gpu.md); or
#   bash benchmarks/gpu_run.sh <40 hex>                         # the commit as the first argument
#   OUT=/tmp/dry LAFS_GPU_DRY_RUN=1 bash benchmarks/gpu_run.sh  # every stage's plumbing on the CPU
#
# Stages: env pre_eager pre_compiled finetune reference parity kernels attention smoke (= smoke_pretrain
# smoke_resume smoke_landmarks smoke_finetune smoke_eval); `data` (loader throughput) on request only.
# The headline steps first (stage 1 eager, then compiled; stage 2 eager and compiled), then the
# reference-style baselines (in-step and worker-overlapped), then the checks. `env` always runs (it
# is the run's record, with the commit and the performance model's prediction for this device).
# $OUT holds at most 6 files: run.log results.jsonl bench.json env.json parity.xml table.md.
#
# Environment: OUT (default out), BUDGET_S (540), COMMIT (the tree's commit: the device copy has no
# .git, so the caller writes it in), STAGES, PYTHON (python3), LAFS_GPU_DRY_RUN (0),
# XF_STAGES (stages that see the carried xformers; default 'env parity attention').
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY="${LAFS_GPU_DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-540}"
export LAFS_COMMIT="${COMMIT:-${1:-}}"  # gpu_env.py records it (git rev-parse where a .git exists)
DEADLINE=$((SECONDS + BUDGET_S))
ALL="env pre_eager pre_compiled finetune reference parity kernels attention smoke"
STAGES="${STAGES:-$ALL}"
[[ " $STAGES " == *" env "* ]] || STAGES="env $STAGES"
XF_STAGES="${XF_STAGES:-env parity attention}"
LOG="$OUT/run.log"
RES="$OUT/results.jsonl"
: >"$RES"; : >"$LOG"  # one call per $OUT (the device tool empties it before each call)
B=$(mktemp -d /tmp/lafs_gpu_run.XXXXXX)  # per-stage benchmark JSONs and logs, merged into $OUT
trap 'rm -rf "$B"' EXIT

export LAFS_GPU_DRY_RUN="$DRY" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
export LAFS_GPU_RUN_CMD="COMMIT=$LAFS_COMMIT STAGES='$STAGES' BUDGET_S=$BUDGET_S LAFS_GPU_DRY_RUN=$DRY bash benchmarks/gpu_run.sh"
# compiler caches outside the tree (a rerun on a machine still warm would reuse them; plan for none)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/lafs_inductor}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/lafs_triton}"
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1  # kernels interpreted; CI has 2 cores
  SMOKE_DEV=(--device cpu --data synthetic:8x4 --batch-size 4)
  # bf16 as on the GPU (where precision auto = bf16): a dtype mismatch that would crash there fails here
  SMOKE_PREC=(train.precision=bf16) EVAL_DTYPE=bf16
  SMOKE_MODEL=(model.depth=1 model.dim=32 model.heads=2 model.head_dim=16 model.mlp_dim=64 "${SMOKE_PREC[@]}")
  STEPS=(2 3 2 2)  # pretrain, resume to, train-landmarks, finetune
else
  export TRITON_INTERPRET=0 OMP_NUM_THREADS=8  # tests/conftest.py respects an explicit 0: compiled kernels
  SMOKE_DEV=(--device cuda)
  SMOKE_PREC=() EVAL_DTYPE=auto
  SMOKE_MODEL=()
  STEPS=(30 40 20 20)
fi
echo "=== $(date -u +%FT%TZ) $LAFS_GPU_RUN_CMD" | tee -a "$LOG"

# Wheels that travel in .whl/ (docs/gpu.md): xformers into its own folder, joined to PYTHONPATH only
# in XF_STAGES; the CUDA 12 runtime (xformers' _C.so needs libcudart.so.12 on a CUDA 13 image) on
# LD_LIBRARY_PATH, never PYTHONPATH (its nvidia/__init__.py would shadow the image's nvidia.* packages).
XF=""
if compgen -G ".whl/xformers-*.whl" >/dev/null && "$PY" -m pip install -q --no-index --no-deps --no-compile \
     --no-cache-dir --upgrade --target /tmp/lafs_xf .whl/xformers-*.whl >>"$LOG" 2>&1; then XF="/tmp/lafs_xf:"; fi
if compgen -G ".whl/nvidia_cuda_runtime_cu12-*.whl" >/dev/null && "$PY" -m pip install -q --no-index --no-deps \
     --no-compile --no-cache-dir --upgrade --target /tmp/lafs_cu12 .whl/nvidia_cuda_runtime_cu12-*.whl >>"$LOG" 2>&1; then
  export LD_LIBRARY_PATH="/tmp/lafs_cu12/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}"
fi

result() {  # result NAME RC SECONDS TIMEOUT SKIPPED SUMMARY -> one JSON line in $RES
  "$PY" - "$@" >>"$RES" <<'EOF'
import json, sys
name, rc, secs, timeout, skipped, summary = sys.argv[1:7]
line = {"stage": name, "rc": int(rc) if rc else None, "seconds": int(secs or 0), "timeout_s": int(timeout or 0)}
if skipped:
    line["skipped"] = skipped
if summary:
    line["summary"] = summary
if rc == "124":
    line["status"] = "timed out"
print(json.dumps(line))
EOF
  tail -n 1 "$RES" | tee -a "$LOG"
}

run_stage() {  # run_stage NAME MAX_S MIN_S command...   (skipped when fewer than MIN_S seconds are left)
  local name=$1 max=$2 min=$3; shift 3
  local left=$((DEADLINE - SECONDS - 15)) t
  t=$((left < max ? left : max))
  if ((t < min)); then
    result "$name" "" 0 0 "${left}s left of BUDGET_S=$BUDGET_S, stage needs ${min}s" ""; return 0
  fi
  local xf="" t0=$SECONDS rc
  [[ " $XF_STAGES " == *" $name "* ]] && xf="$XF"
  echo "=== $(date -u +%T) stage $name (timeout ${t}s)" | tee -a "$LOG"
  # SIGINT first: pytest then ends its session, so pytest-benchmark still writes what it timed
  PYTHONPATH="$xf$PYTHONPATH" timeout -s INT -k 20 "$t" "$@" >"$B/$name.log" 2>&1
  rc=$?
  cat "$B/$name.log" >>"$LOG"
  local summary
  summary=$(grep -E '(passed|failed|skipped|error|deselected|no tests ran)' "$B/$name.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  result "$name" "$rc" $((SECONDS - t0)) "$t" "" "$summary"
  "$PY" benchmarks/render.py --merge "$B" "$OUT/bench.json" >>"$LOG" 2>&1
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10 -o addopts="")
bench() {  # bench NAME MAX_S MIN_S FILE -k EXPR  : one pytest-benchmark session, its JSON in $B
  local name=$1 max=$2 min=$3 file=$4; shift 4
  # LAFS_BENCH_CASES: benchmarks/conftest.py appends each timed case there as it ends, the fallback
  # render.py --merge reads when pytest-benchmark wrote no JSON (a cut session, a changed private API)
  run_stage "$name" "$max" "$min" env TORCH_LOGS="${TORCH_LOGS:-recompiles,graph_breaks}" \
    LAFS_BENCH_CASES="$B/$name.cases.jsonl" "${PYTEST[@]}" \
    --benchmark-json="$B/$name.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$file" "$@"
}

smoke_eval() {  # smoke_eval DEVICE DTYPE: held-out synthetic identities -> face folder -> .bin -> eval of the stage-2 model
  "$PY" - "$S" <<'EOF' && "$PY" -m lafs_fast.cli eval "$S/s2/part_fvit.pt" "$S/val.bin" --no-progress --json --device "$1" --dtype "$2"
import sys
from pathlib import Path
from PIL import Image
from lafs_fast.data import SyntheticFaces
from lafs_fast.data.make_bin import make_bin  # what `lafs-fast data make-bin` runs (one process less)
root = Path(sys.argv[1])
ds = SyntheticFaces(8, 4, seed=123)
for i in range(8):
    images, _ = ds.batch(range(i * 4, i * 4 + 4))
    (root / "faces" / f"id{i}").mkdir(parents=True, exist_ok=True)
    for j, im in enumerate(images):
        Image.fromarray(im.numpy()).save(root / "faces" / f"id{i}" / f"{j}.png")
make_bin(root / "faces", root / "val.bin", num_pairs=40, seed=0)
EOF
}
export -f smoke_eval

needs() {  # needs STAGE FILE: record a skip when an earlier smoke step left no FILE
  [[ -f $2 ]] && return 0
  result "$1" "" 0 0 "no $2 (an earlier smoke step failed or did not run)" ""; return 1
}

S="$B/smoke"  # the smoke steps' checkpoints: one call's, gone with it
export S PY
L=("$PY" -m lafs_fast.cli)
for s in $STAGES; do
  [[ $s == smoke ]] && s="smoke_pretrain smoke_resume smoke_landmarks smoke_finetune smoke_eval"
  for st in $s; do
    case $st in
      env)  # versions, device, driver, `lafs-fast info --json` (backends; whether xformers' kernels loaded)
        # shellcheck disable=SC2016  # expanded by the inner bash
        # + the performance model's predicted table for this device (datasheets and measured ceilings)
        run_stage env 60 20 bash -c '"$0" benchmarks/gpu_env.py "$OUT/env.json" || exit
          "$0" benchmarks/perf_model.py --measured $([[ $1 == 1 ]] && echo "model.depth=1") || exit; [[ $1 == 1 ]] && exit
          nvidia-smi 2>&1 | head -20; XFORMERS_MORE_DETAILS=1 "$0" -m xformers.info 2>&1 |
          grep -E "memory_efficient_attention[.]|xFormers|Error|cannot open|built for" | head -30; exit 0' "$PY" "$DRY" ;;
      pre_eager)  # the headline: one stage-1 step at the reference preset (82 images x 10 views), eager
        bench pre_eager 75 30 benchmarks/test_bench_pretrain.py -k "fast_gpu and eager" ;;
      pre_compiled)  # the cold compile of the fViT (student and teacher) is most of this stage
        bench pre_compiled 210 90 benchmarks/test_bench_pretrain.py -k "fast_gpu and compiled" ;;
      finetune)  # one stage-2 step at the reference preset (200 images, 10,000 classes): eager, then compiled
        bench finetune 180 45 benchmarks/test_bench_finetune.py -k "fast_gpu" ;;
      reference)  # the baselines: reference style in the step (strawman) and with DataLoader workers (honest)
        bench reference 120 30 benchmarks/test_bench_pretrain.py benchmarks/test_bench_finetune.py \
          -k "reference_style_gpu or reference_pipeline_gpu" ;;
      parity)  # the CUDA / xformers / nvJPEG tests only: compiled kernels against their twins
        run_stage parity 120 40 "${PYTEST[@]}" --junitxml="$OUT/parity.xml" -k "cuda or xformers or gpu_paths" \
          tests/test_kernels_patch.py tests/test_kernels_augment.py tests/test_detector_landmarks.py \
          tests/test_models.py tests/test_view_packing.py tests/test_data_loaders.py ;;
      kernels)  # device ceilings; sampler: loop / twin / compiled twin / Triton; views: torchvision / twin / Triton
        bench kernels 120 40 benchmarks/test_bench_device.py benchmarks/test_bench_kernels.py -k "_gpu or device" ;;
      attention)
        bench attention 60 20 benchmarks/test_bench_attention.py -k "_gpu" ;;
      data)  # loader throughput (nvJPEG, DALI, PIL workers); on request only
        bench data 120 40 benchmarks/test_bench_data.py -k "gpu" ;;
      smoke_pretrain)  # the README's first command on the device: bf16 views, k-NN check, checkpoints
        mkdir -p "$S"
        run_stage smoke_pretrain 120 30 "${L[@]}" pretrain "${SMOKE_DEV[@]}" --max-steps "${STEPS[0]}" --no-progress \
          --out "$S/s1" "${SMOKE_MODEL[@]}" dino.out_dim=64 dino.hidden_dim=32 dino.bottleneck_dim=16 ;;
      smoke_resume)
        needs smoke_resume "$S/s1/teacher.pt" && run_stage smoke_resume 90 20 "${L[@]}" pretrain "${SMOKE_DEV[@]}" \
          --max-steps "${STEPS[1]}" --no-progress --no-knn --out "$S/s1" "${SMOKE_MODEL[@]}" \
          dino.out_dim=64 dino.hidden_dim=32 dino.bottleneck_dim=16 --resume ;;
      smoke_landmarks)
        run_stage smoke_landmarks 90 20 "${L[@]}" train-landmarks "${SMOKE_DEV[@]}" --max-steps "${STEPS[2]}" \
          --no-progress --no-check --out "$S/s0" "${SMOKE_MODEL[@]}" ;;
      smoke_finetune)
        needs smoke_finetune "$S/s1/teacher.pt" && needs smoke_finetune "$S/s0/part_fvit.pt" && \
          run_stage smoke_finetune 90 20 "${L[@]}" finetune "${SMOKE_DEV[@]}" --max-steps "${STEPS[3]}" --no-progress \
          --no-check --init "$S/s1/teacher.pt" --landmarks "$S/s0/part_fvit.pt" --out "$S/s2" "${SMOKE_PREC[@]}" ;;
      smoke_eval)
        # shellcheck disable=SC2016  # expanded by the inner bash
        needs smoke_eval "$S/s2/part_fvit.pt" && run_stage smoke_eval 60 20 bash -c 'smoke_eval "$0" "$1"' "${SMOKE_DEV[1]}" "$EVAL_DTYPE" ;;
      *)
        echo "unknown stage $st" | tee -a "$LOG"; result "$st" 2 0 0 "" "unknown stage (known: $ALL data)" ;;
    esac
  done
done
"$PY" benchmarks/render.py "$OUT" >"$OUT/table.md" 2>>"$LOG"
cat "$OUT/table.md"
echo "=== $(date -u +%T) done in $SECONDS s; $OUT/results.jsonl:"
cat "$RES"
