"""Checks an installed omnifuse_fast: which extensions loaded, and which kernels they registered.

    python -W error scripts/check_install.py --expect-cuda [--ptx 90]
        _C and _C_cuda load, every torch.ops.omnifuse_fast op has a CPU and a CUDA kernel, and
        (--ptx) the CUDA extension carries PTX for that arch (``cuobjdump --list-ptx``).
    python scripts/check_install.py --expect-no-cuda
        _C loads, _C_cuda does not and ``_ext.status()`` says why, the ``cpu`` backend runs.

Used by .ci/run and scripts/gpu_check.sh. Run it outside the source tree (or with ``python -P``)
so the installed package is the one imported. Exits 1 with the reason when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import omnifuse_fast as of
from omnifuse_fast import _ext


def _fail(msg: str) -> int:
    print(f"check_install: FAILED: {msg}", file=sys.stderr)
    return 1


def omnifuse_ops() -> list[str]:
    """Every op registered under the omnifuse_fast namespace (schemas of csrc/ops.cpp)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("omnifuse_fast::"))


def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the copy Triton ships."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "cuobjdump").exists():
            return str(Path(home, "bin", "cuobjdump"))
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return None


def check_ptx(arch: str) -> str | None:
    """None when _C_cuda embeds PTX for ``arch`` (and SASS), else what is wrong."""
    spec = importlib.util.find_spec(_ext.CUDA_MODULE)
    tool = cuobjdump()
    if spec is None or spec.origin is None:
        return f"{_ext.CUDA_MODULE} is not installed"
    if tool is None:
        return "no cuobjdump found (CUDA_HOME, /usr/local/cuda, PATH or Triton's)"
    ptx = subprocess.run([tool, "--list-ptx", spec.origin], capture_output=True, text=True)
    elf = subprocess.run([tool, "--list-elf", spec.origin], capture_output=True, text=True)
    print(f"{Path(tool).name} --list-ptx:\n{ptx.stdout.strip()}\n--list-elf:\n{elf.stdout.strip()}")
    if ptx.returncode != 0 or f"sm_{arch}" not in ptx.stdout:
        return f"no PTX for sm_{arch} in {spec.origin}: {ptx.stdout}{ptx.stderr}"
    if "sm_" not in elf.stdout:
        return f"no SASS in {spec.origin}: {elf.stdout}{elf.stderr}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--expect-cuda", action="store_true")
    mode.add_argument("--expect-no-cuda", action="store_true")
    parser.add_argument("--ptx", metavar="ARCH", help="e.g. 90: _C_cuda must carry its PTX")
    args = parser.parse_args(argv)

    print(
        f"omnifuse_fast {of.__version__} from {Path(of.__file__).parent}, torch {torch.__version__}"
    )
    print(_ext.status())
    if not _ext.HAS_EXTENSION:
        return _fail(f"{_ext.CPU_MODULE} did not load: {_ext.LOAD_ERROR}")
    ops = omnifuse_ops()
    if len(ops) < 10:
        return _fail(f"only {len(ops)} omnifuse_fast ops registered: {ops}")
    no_cpu = [op for op in ops if not _ext.has_kernel(op, "CPU")]
    if no_cpu:
        return _fail(f"ops without a CPU kernel: {no_cpu}")
    if args.expect_cuda:
        no_cuda = [
            op for op in ops if op not in _ext.CPU_ONLY_OPS and not _ext.has_kernel(op, "CUDA")
        ]
        if no_cuda:
            return _fail(f"ops without a CUDA kernel: {no_cuda} ({_ext.CUDA_LOAD_ERROR})")
        print(
            f"{len(ops)} ops, every one with a CPU kernel and all but the CPU-only "
            f"{len(_ext.CPU_ONLY_OPS)} ({', '.join(_ext.CPU_ONLY_OPS)}) with a CUDA kernel"
        )
        if args.ptx and (problem := check_ptx(args.ptx)):
            return _fail(problem)
    else:
        if _ext.HAS_CUDA_KERNELS or _ext.EXTENSIONS[_ext.CUDA_MODULE].loaded:
            return _fail("the CUDA kernels were expected to be missing")
        if not _ext.CUDA_LOAD_ERROR or _ext.CUDA_LOAD_ERROR not in _ext.status():
            return _fail("status() does not say why the CUDA kernels are missing")
        print(f"{len(ops)} ops with CPU kernels; no CUDA kernels, as expected")
    z = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 2, 1, 0])
    got = of.dwfuse_loss(z, y, backend="cpu")
    (grad,) = torch.autograd.grad(got, z)
    want = of.dwfuse_loss(z, y, backend="reference")
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close((got, grad), (want, want_grad))
    print("the cpu backend runs (forward and backward match the reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
