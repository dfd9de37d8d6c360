#!/usr/bin/env bash
# One command proves the GPU paths of omnifuse_fast on a GPU machine (made for an H200 with
# 16 cores, Python 3.12, torch 2.11+cu130, Triton 3.6, nvcc 13.0, compute-sanitizer, no network).
#
#   scripts/gpu_check.sh --out DIR [--wheels DIR] [--dry-run]
#
# Steps (each time-boxed; all run even when one fails; the whole check stays under 8 minutes):
#   env        versions and the device, into DIR/env.txt
#   deps       the test/benchmark packages, installed from --wheels DIR only (no network)
#   build      the extensions for the local GPU arch (CUDA forced, MAX_JOBS = cores), then a
#              check that every op has a CUDA kernel
#   pytest     pytest -m gpu with OMNIFUSE_EXPECT_BACKENDS=cpu,triton,cuda
#   sanitizer  compute-sanitizer --tool memcheck over scripts/gpu_sanitize_driver.py (every op
#              forward + backward on the cuda and triton backends)
#   bench      OMNIFUSE_BENCH_LARGE=1 benchmarks: one case per op of every family, providers
#              reference / triton / cuda, into DIR/bench.json
# Logs go to DIR/<step>.log, results to DIR/*.json; the summary table (DIR/summary.md, also
# DIR/summary.json) is printed last. Exit status: 0 when every step passed.
# --dry-run prints every step's command and exits 0 (no GPU needed; CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" WHEELS="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="gpu-check-out"; else echo "gpu_check.sh: --out DIR is required" >&2; exit 2; fi
fi

PY="${PYTHON:-python3}"
CORES="$(nproc 2>/dev/null || echo 4)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # under 8 minutes in all
START=$SECONDS
STEPS=()
[ "$DRY" = 1 ] || mkdir -p "$OUT"
OUT_ABS="$(cd "$(dirname "$OUT")" 2>/dev/null && pwd)/$(basename "$OUT")"

# step NAME LIMIT_S COMMAND: runs COMMAND with the smaller of LIMIT_S and what is left of the
# budget, its output in DIR/NAME.log; records "name status seconds" for the summary.
step() {
  local name="$1" limit="$2" cmd="$3"
  if [ "$DRY" = 1 ]; then
    printf '[dry-run] %-9s (limit %ss)\n    %s\n' "$name" "$limit" "$cmd"
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit="$left"
  local log="$OUT/$name.log" t0=$SECONDS rc
  if [ "$limit" -le 5 ]; then
    echo "skipped: the time budget (${BUDGET_S}s) is spent" > "$log"; rc=124
  else
    echo "+ $cmd" > "$log"
    echo "=== $name (limit ${limit}s): $cmd"
    timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$log" 2>&1
    rc=$?
  fi
  local status="ok"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timeout"
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="FAILED(rc=$rc)"
  echo "    -> $status in $((SECONDS - t0))s ($log)"
  [ "$status" = ok ] || tail -n 15 "$log" | sed 's/^/    | /'
  STEPS+=("$name $status $((SECONDS - t0))")
}

PIP_SRC="--no-index"
[ -n "$WHEELS" ] && PIP_SRC="--no-index --find-links $WHEELS"
ARCH="\$($PY -c 'import torch; print(\"%d%d\" % torch.cuda.get_device_capability(0))')"
CHECK_KERNELS="$PY -P -W error scripts/check_install.py --expect-cuda --ptx $ARCH"

step env 30 "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; compute-sanitizer --version | head -2; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)); print(\"triton\", triton.__version__)' | tee $OUT/env.txt"
step deps 90 "$PY -m pip install -q $PIP_SRC numpy scikit-learn matplotlib tqdm pytest pytest-benchmark hypothesis"
step build 300 "OMNIFUSE_FAST_FORCE_CUDA=1 MAX_JOBS=$CORES $PY -m pip install -v --no-build-isolation --no-deps $PIP_SRC -e . && $CHECK_KERNELS"
step pytest 120 "OMNIFUSE_EXPECT_BACKENDS=cpu,triton,cuda $PY -m pytest -m gpu -q -p no:cacheprovider tests --junitxml=$OUT_ABS/pytest_gpu.xml"
step sanitizer 150 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 --log-file $OUT_ABS/memcheck.log $PY scripts/gpu_sanitize_driver.py --device cuda --backends cuda,triton > $OUT_ABS/sanitizer.json"
step bench 120 "OMNIFUSE_BENCH_LARGE=1 OMNIFUSE_BENCH_NO_COMPILE=1 $PY scripts/gpu_check_tools.py bench-subset --providers reference,triton,cuda > $OUT_ABS/bench_cases.txt && OMNIFUSE_BENCH_LARGE=1 OMNIFUSE_BENCH_NO_COMPILE=1 $PY -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-json=$OUT_ABS/bench.json \$(cat $OUT_ABS/bench_cases.txt) && $PY -m omnifuse_fast.bench report $OUT_ABS/bench.json"

if [ "$DRY" = 1 ]; then
  echo "[dry-run] summary   $PY scripts/gpu_check_tools.py summary $OUT_ABS"
  echo "dry run: $(grep -c '^step ' "$0") steps listed; nothing was run"
  exit 0
fi
printf '%s\n' "${STEPS[@]}" > "$OUT/steps.txt"
$PY scripts/gpu_check_tools.py summary "$OUT" --total-seconds $((SECONDS - START))
