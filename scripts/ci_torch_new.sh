#!/usr/bin/env bash
# Part 2 of .ci/run: the install on the newest torch this machine serves, with its CUDA build
# (no GPU needed to build). Runnable alone: scripts/ci_torch_new.sh
#
# 1. A failing nvcc (CUDA_HOME -> a fake nvcc that exits 1, CUDA forced on): the install still
#    succeeds, without the CUDA kernels, and the cpu backend runs.
# 2. A clean clone is built ONCE into a wheel with the CUDA kernels forced on, for
#    TORCH_CUDA_ARCH_LIST=9.0 (one arch keeps the 2-core build near 7 minutes; the default list
#    and the PTX rule are unit-tested in tests/test_build.py), and installed: imports with
#    warnings as errors, every op has a CUDA kernel, the .so carries sm_90 SASS and compute_90
#    PTX; the CPU test files that matter run against it.
# 3. The same wheel in a fresh venv (created in the background meanwhile): no build step.
# 4. scripts/gpu_check.sh --dry-run.
# Environment: TORCH_NEW (default 2.14.1), CI_WORK (scratch dir; default a new /tmp dir,
# removed at the end unless CI_KEEP=1), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
TORCH_NEW="${TORCH_NEW:-2.14.1}"
export MAX_JOBS="${MAX_JOBS:-2}"
W="${CI_WORK:-$(mktemp -d /tmp/omnifuse-ci.XXXXXX)}"
mkdir -p "$W"
[ "${CI_KEEP:-0}" = 1 ] || trap 'rm -rf "$W"' EXIT
T0=$SECONDS
say() { echo "[part 2, torch $TORCH_NEW, +$((SECONDS - T0))s] $*"; }
unset OMNIFUSE_FAST_SKIP_CUDA OMNIFUSE_FAST_SKIP_EXT OMNIFUSE_FAST_CUDA_ARCHS TORCH_CUDA_ARCH_LIST

# The fresh venv for step 3 fills in the background (mostly disk copying) while we compile.
(python3 -m venv "$W/fresh" && "$W/fresh/bin/pip" install -q "torch==$TORCH_NEW") \
  > "$W/fresh.log" 2>&1 &
FRESH_PID=$!

say "build venv"
python3 -m venv "$W/venv"
B="$W/venv/bin"
"$B/pip" install -q "torch==$TORCH_NEW"
git clone -q "$REPO" "$W/clone"
cd "$W/clone"

say "1. a failing nvcc must not fail the install"
mkdir -p "$W/badcuda/bin"
printf '#!/bin/sh\necho "nvcc fatal: broken on purpose (CI)" >&2\nexit 1\n' > "$W/badcuda/bin/nvcc"
chmod +x "$W/badcuda/bin/nvcc"
OMNIFUSE_FAST_FORCE_CUDA=1 CUDA_HOME="$W/badcuda" "$B/pip" install -v --no-build-isolation . \
  > "$W/bad_nvcc_install.log" 2>&1 || { tail -50 "$W/bad_nvcc_install.log"; exit 1; }
grep -A3 "the CUDA kernels are NOT built" "$W/bad_nvcc_install.log"
grep -q "OMNIFUSE_FAST_SKIP_CUDA" "$W/bad_nvcc_install.log"
# -P: import the installed package, not the clone's source tree
(cd "$W" && "$B/python" -P clone/scripts/check_install.py --expect-no-cuda)
"$B/pip" uninstall -q -y omnifuse-fast
rm -rf build ./*.egg-info  # objects built against the fake toolkit

say "2. one CUDA build: a wheel with the CUDA kernels forced on"
OMNIFUSE_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$B/pip" wheel -v --no-build-isolation --no-deps -w "$W/dist" . \
  > "$W/wheel_build.log" 2>&1 || { tail -80 "$W/wheel_build.log"; exit 1; }
if grep -q "the CUDA kernels are NOT built" "$W/wheel_build.log"; then
  grep -B30 -A3 "the CUDA kernels are NOT built" "$W/wheel_build.log"
  exit 1
fi
WHEEL="$(ls "$W"/dist/omnifuse_fast-*.whl)"
say "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$B/pip" install -q "$WHEEL"
(cd "$W" && "$B/python" -P -W error clone/scripts/check_install.py --expect-cuda --ptx 90)

say "2b. the CPU test files that matter on this torch, against the installed wheel"
"$B/pip" install -q pytest hypothesis
OMNIFUSE_EXPECT_BACKENDS=cpu "$B/python" -P -m pytest -q -p no:cacheprovider \
  tests/test_cpu_backend.py tests/test_compile.py tests/test_cuda_compile.py tests/test_build.py

say "3. the wheel in a fresh venv: no build step"
wait "$FRESH_PID" || { cat "$W/fresh.log"; exit 1; }
"$W/fresh/bin/pip" install -q --only-binary=:all: "$WHEEL"
(cd "$W" && "$W/fresh/bin/python" -P -W error clone/scripts/check_install.py --expect-cuda --ptx 90)

say "4. the GPU check, dry run"
bash scripts/gpu_check.sh --dry-run

say "part 2 passed in $((SECONDS - T0))s"
