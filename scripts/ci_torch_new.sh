#!/usr/bin/env bash
# Part 2 of .ci/run: the install on the newest torch this machine serves, with its CUDA build
# (no GPU needed to build). Runnable alone: scripts/ci_torch_new.sh
# It builds the COMMITTED state (HEAD) of this checkout, cloned into a scratch dir.
#
# 1. A failing nvcc (CUDA_HOME -> a toolkit whose nvcc answers --version but fails every
#    compile, CUDA forced on): the install still succeeds, without the CUDA kernels, one message
#    names the cause and OMNIFUSE_FAST_SKIP_CUDA, and the cpu backend runs.
# 2. A clean clone is built ONCE into a wheel with the CUDA kernels forced on, for
#    TORCH_CUDA_ARCH_LIST=9.0 (one arch keeps the 2-core build near 7 minutes; the default list
#    and the PTX rule are unit-tested in tests/test_build.py), and installed: imports with
#    warnings as errors, every op has a CUDA kernel, the .so carries sm_90 SASS and compute_90
#    PTX. The CPU objects of step 1 are reused (same compile commands: ninja skips them).
# 2b. The CPU test files that matter on this torch run against the installed wheel
#    (tests/test_cuda_compile.py is left to part 1: step 2 is the real nvcc build against this
#    torch's headers, which that test only approximates, and it would compile everything again).
# 3. The same wheel in a fresh venv (filled in the background meanwhile): no build step.
# 4. scripts/gpu_check.sh --dry-run lists the build, pytest -m gpu, sanitizer and bench steps.
#
# Timings, 2-core machine, 2026-12-02 (the log ends with "part 2 timings" and CPU times):
#   quiet machine, commit 3e873fd, PASSED end to end in 892 s: step 0 101 s, 1 311 s, 2 319 s
#   (the sm_90 CUDA wheel; step 1's CPU objects reused), 2b 118 s, 3 43 s, 4 0 s. With part 1
#   (~24 min) .ci/run takes ~39 min. Under load (3-13) an earlier commit took 6366 s.
# Environment: TORCH_NEW (default 2.14.1), CI_WORK (scratch dir; default a new /tmp dir),
# CI_KEEP=1 (keep the scratch dir; it is ~12 GB: two torch venvs), MAX_JOBS (default 2),
# CI_CUDA_HOME (the real toolkit; default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
REV="$(git rev-parse HEAD)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "ci_torch_new.sh: uncommitted changes are NOT tested; building commit $REV" >&2
fi
TORCH_NEW="${TORCH_NEW:-2.14.1}"
REAL_CUDA="${CI_CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
W="${CI_WORK:-$(mktemp -d /tmp/omnifuse-ci.XXXXXX)}"
mkdir -p "$W"
FRESH_PID=""
cleanup() {
  if [ -n "$FRESH_PID" ] && kill -0 "$FRESH_PID" 2>/dev/null; then
    kill "$FRESH_PID" 2>/dev/null || true
    wait "$FRESH_PID" 2>/dev/null || true
  fi
  if [ "${CI_KEEP:-0}" = 1 ]; then echo "kept $W ($(du -sh "$W" | cut -f1))"; else rm -rf "$W"; fi
}
trap cleanup EXIT
T0=$SECONDS
TIMES=()
LAST=$SECONDS
say() {
  if [ -n "${STEP:-}" ]; then TIMES+=("${STEP%%.*}:$((SECONDS - LAST))s"); fi
  STEP="$1" LAST=$SECONDS
  echo "[part 2, torch $TORCH_NEW, +$((SECONDS - T0))s] $*"
}
unset OMNIFUSE_FAST_SKIP_CUDA OMNIFUSE_FAST_SKIP_EXT OMNIFUSE_FAST_CUDA_ARCHS TORCH_CUDA_ARCH_LIST \
  OMNIFUSE_FAST_FORCE_CUDA CUDA_HOME CUDA_PATH PYTHONPATH

say "0. a venv with torch $TORCH_NEW; clone of $REV"
python3 -m venv "$W/venv"
B="$W/venv/bin"
"$B/pip" install -q "torch==$TORCH_NEW"
# The fresh venv for step 3 fills in the background (mostly disk I/O) while steps 1-2 compile.
python3 -m venv "$W/fresh"
"$W/fresh/bin/pip" install -q "torch==$TORCH_NEW" > "$W/fresh.log" 2>&1 &
FRESH_PID=$!
git clone -q "$REPO" "$W/clone"
cd "$W/clone"
git checkout -q --detach "$REV"

say "1. a failing nvcc must not fail the install"
# A toolkit whose nvcc reports its version like the real one (so the build gets as far as
# compiling) and then fails every compile: the worst case, a failure in the middle of the build.
mkdir -p "$W/badcuda/bin"
ln -sfn "$REAL_CUDA/include" "$W/badcuda/include"
ln -sfn "$REAL_CUDA/lib64" "$W/badcuda/lib64"
cat > "$W/badcuda/bin/nvcc" <<EOF
#!/bin/sh
case " \$* " in *" --version "*|*" --list-gpu-arch "*) exec "$REAL_CUDA/bin/nvcc" "\$@" ;; esac
echo "nvcc fatal : broken on purpose (CI)" >&2
exit 1
EOF
chmod +x "$W/badcuda/bin/nvcc"
OMNIFUSE_FAST_FORCE_CUDA=1 CUDA_HOME="$W/badcuda" "$B/pip" install -v --no-build-isolation . \
  > "$W/bad_nvcc_install.log" 2>&1 || { tail -50 "$W/bad_nvcc_install.log"; exit 1; }
grep -m1 "broken on purpose" "$W/bad_nvcc_install.log"
grep -A3 "the CUDA kernels are NOT built" "$W/bad_nvcc_install.log"
[ "$(grep -c "the CUDA kernels are NOT built" "$W/bad_nvcc_install.log")" = 1 ]
grep -q "compiling csrc/cuda failed" "$W/bad_nvcc_install.log"
grep -q "OMNIFUSE_FAST_SKIP_CUDA" "$W/bad_nvcc_install.log"
# -P: import the installed package, not the clone's source tree
(cd "$W" && "$B/python" -P clone/scripts/check_install.py --expect-no-cuda)
"$B/pip" uninstall -q -y omnifuse-fast
# keep build/temp*: the CPU objects are the same for step 2 (ninja skips them); the failed CUDA
# objects were compiled against the fake toolkit's path, so their commands differ and rebuild
rm -rf build/lib* build/bdist* ./*.egg-info

say "2. one CUDA build: a wheel with the CUDA kernels forced on"
OMNIFUSE_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$B/pip" wheel -v --no-build-isolation --no-deps -w "$W/dist" . \
  > "$W/wheel_build.log" 2>&1 || { tail -80 "$W/wheel_build.log"; exit 1; }
if grep -q "the CUDA kernels are NOT built" "$W/wheel_build.log"; then
  grep -B30 -A3 "the CUDA kernels are NOT built" "$W/wheel_build.log"
  exit 1
fi
echo "compile steps: $(grep -c '^ *\[[0-9]*/[0-9]*\]' "$W/wheel_build.log" || true)," \
  "compiler warnings: $(grep -cE ': warning:|\): warning #' "$W/wheel_build.log" || true)"
grep -m1 -o -- "-gencode=arch=compute_90,code=compute_90" "$W/wheel_build.log" ||
  echo "(the log shows no compute_90 PTX flag; check_install looks into the .so)"
WHEEL="$(ls "$W"/dist/omnifuse_fast-*.whl)"
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$B/pip" install -q "$WHEEL"
(cd "$W" && "$B/python" -P -W error clone/scripts/check_install.py --expect-cuda --ptx 90)

say "2b. the CPU test files that matter on this torch, against the installed wheel"
"$B/pip" install -q pytest hypothesis
# -P and the tests dir (no __init__.py) on sys.path: the installed package is the one tested
OMNIFUSE_EXPECT_BACKENDS=cpu "$B/python" -P -m pytest -q -p no:cacheprovider \
  tests/test_cpu_backend.py tests/test_compile.py tests/test_build.py
"$B/python" -P -c "import omnifuse_fast, sys; sys.exit('site-packages' not in omnifuse_fast.__file__)"

say "3. the wheel in a fresh venv: no build step"
wait "$FRESH_PID" || { cat "$W/fresh.log"; exit 1; }
FRESH_PID=""
"$W/fresh/bin/pip" install -q --only-binary=:all: "$WHEEL"
(cd "$W" && "$W/fresh/bin/python" -P -W error clone/scripts/check_install.py --expect-cuda --ptx 90)

say "4. the GPU check, dry run"
bash scripts/gpu_check.sh --dry-run | tee "$W/gpu_check_dry_run.log"
for needle in "build " "pytest -m gpu" "compute-sanitizer --tool memcheck" "OMNIFUSE_BENCH_LARGE=1"; do
  grep -q -- "$needle" "$W/gpu_check_dry_run.log" || { echo "dry run lacks '$needle'" >&2; exit 1; }
done

say "done"
echo "part 2 timings: ${TIMES[*]}"
echo "part 2 passed in $((SECONDS - T0))s; CPU time (user sys: this shell, then its children):"
times
