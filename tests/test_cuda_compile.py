"""nvcc compile checks of the CUDA kernels, with no GPU and no CUDA build of torch needed.

- Every ``csrc/cuda/*.cuh`` is compiled for sm_90 (PTX and SASS) in a generated translation
  unit that includes it and explicitly instantiates every host launcher (the header's
  ``OMNIFUSE_GPU_INSTANTIATE_*`` macro) for fp32, fp16 and bf16, and fp64 where the bindings
  dispatch fp64 to the kernels. That instantiates every kernel template the bindings can launch.
- The bindings (``csrc/cuda/*.cu``) are type-checked against the installed torch's headers in
  one translation unit. A CPU-only torch ships ATen's CUDA headers but the CUDA toolkit here may
  lack the cuBLAS/cuSPARSE/cuSOLVER headers they include; those few handle and status types are
  then declared in a scratch include directory (only for this check; the real build uses the
  toolkit's headers).

The flags are the ones torch's cpp_extension passes to nvcc (no implicit half conversions), and
the C++ standard is the one setup.py builds with (the installed torch's: C++20 from torch 2.13).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

FAMILIES = ("cra", "dwfuse", "tla", "mix", "mimo")
TYPES = ("float", "__half", "__nv_bfloat16")
# Families whose bindings send fp64 tensors to the kernels (the CRA binding runs fp64 in ATen).
FP64_FAMILIES = {"dwfuse", "tla", "mix", "mimo"}
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
HEADER_FLAGS = ["-arch=sm_90", "-O3", *TORCH_NVCC_FLAGS]
TIMEOUT_S = 600

HEADERS = sorted(CUDA_DIR.glob("*.cuh"))


@functools.cache
def _setup_module():
    """setup.py's build logic (one source of truth for the flags of the real build)."""
    spec = importlib.util.spec_from_file_location("omnifuse_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines functions only: setup() runs as __main__
    return setup_module


@functools.cache
def _std_flag() -> str:
    """``-std=...`` as setup.py decides it for the installed torch."""
    return f"-std={_setup_module().cxx_std()}"


def _instantiations(header: Path) -> list[str]:
    macros = re.findall(r"#define\s+(OMNIFUSE_GPU_INSTANTIATE_\w+)\(", header.read_text())
    types = TYPES + (("double",) if header.stem in FP64_FAMILIES else ())
    return [f"{macro}({t})" for macro in macros for t in types]


def _compile_header(header: Path, workdir: Path) -> tuple[int, str, float]:
    unit = workdir / f"check_{header.stem}.cu"
    lines = [f'#include "{header.name}"', *_instantiations(header)]
    unit.write_text("\n".join(lines) + "\n")
    cmd = [
        NVCC,
        *HEADER_FLAGS,
        _std_flag(),
        f"-I{CUDA_DIR}",
        "-c",
        str(unit),
        "-o",
        str(unit.with_suffix(".o")),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def header_builds(tmp_path_factory) -> dict[str, tuple[int, str, float]]:
    """Compiles every header once, in parallel; {stem: (returncode, output, seconds)}."""
    workdir = tmp_path_factory.mktemp("cuda_headers")
    _std_flag()  # once, before the threads
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {h.stem: pool.submit(_compile_header, h, workdir) for h in HEADERS}
        results = {stem: f.result() for stem, f in futures.items()}
    wall = time.perf_counter() - start
    each = ", ".join(f"{s} {r[2]:.0f}s" for s, r in results.items())
    print(f"\nnvcc sm_90 header checks: {wall:.0f}s wall ({each})", file=sys.stderr)
    return results


def test_every_family_has_a_kernel_header_and_a_binding():
    stems = {h.stem for h in HEADERS}
    for family in FAMILIES:
        assert family in stems, f"csrc/cuda/{family}.cuh is missing"
        assert (CUDA_DIR / f"{family}.cu").exists(), f"csrc/cuda/{family}.cu is missing"
        assert _instantiations(CUDA_DIR / f"{family}.cuh"), (
            f"{family}.cuh defines no OMNIFUSE_GPU_INSTANTIATE_* macro"
        )


def test_kernel_headers_are_torch_free():
    for header in HEADERS:
        text = header.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), header.name


@pytest.mark.parametrize("header", HEADERS, ids=[h.stem for h in HEADERS])
def test_header_compiles_for_sm90(header, header_builds):
    code, output, _ = header_builds[header.stem]
    assert code == 0, f"nvcc failed on {header.name}:\n{output[-6000:]}"
    assert "warning" not in output.lower(), f"nvcc warned on {header.name}:\n{output[-6000:]}"


# ------------------------------------------------------------------------------------ bindings
# Declarations the ATen CUDA headers need from CUDA libraries a bare toolkit may not ship.
_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
    "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
    'inline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }\n',
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
    "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0,"
    " CUSOLVER_STATUS_EXECUTION_FAILED = 6 } cusolverStatus_t;\n",
    "cusolverDn.h": '#include "cusolver_common.h"\n'
    "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


def _toolkit_include() -> Path:
    from torch.utils import cpp_extension

    setup_module = _setup_module()
    try:  # as setup.py finds it (nvcc on PATH may be a wrapper script)
        return Path(setup_module.find_cuda_home(cpp_extension.CUDA_HOME)) / "include"
    except setup_module.CudaSkip:
        return Path(NVCC).resolve().parent.parent / "include"


def test_bindings_compile_against_torch_headers(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    stub_dir = tmp_path / "stubs"
    torch_includes = [Path(p) for p in cpp_extension.include_paths()]
    # a CUDA torch's pip nvidia packages: searched after every -I dir, as in setup.py
    pip_includes = sorted((Path(torch.__file__).parents[1] / "nvidia").glob("*/include"))
    for name, body in _STUBS.items():
        dirs = [_toolkit_include(), *torch_includes, *pip_includes]
        found = any((d / name).exists() for d in dirs)
        if not found:
            path = stub_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#pragma once\n" + body)
    if not (Path(torch.__file__).parent / "include" / "ATen" / "cuda" / "CUDAContext.h").exists():
        pytest.skip("this torch ships no ATen CUDA headers")
    unit = tmp_path / "bindings.cu"
    unit.write_text("".join(f'#include "{f}.cu"\n' for f in FAMILIES))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        NVCC,
        _std_flag(),
        *TORCH_NVCC_FLAGS,
        # PTX only: the kernels' SASS is checked above; this is about the host-side ATen code
        "-gencode=arch=compute_90,code=compute_90",
        "-Xcompiler=-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C",
        *([f"-I{stub_dir}"] if stub_dir.exists() else []),
        *[f"-I{p}" for p in torch_includes],
        f"-I{CUDA_DIR}",
        *[arg for d in pip_includes for arg in ("-isystem", str(d))],
        "-c",
        str(unit),
        "-o",
        str(tmp_path / "bindings.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=CUDA_DIR)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on the bindings:\n{output[-8000:]}"
    # the ATen headers' own C++20 notes are not ours; any warning in csrc/cuda is
    ours = [line for line in output.splitlines() if "csrc/cuda" in line and "warning" in line]
    assert not ours, "\n".join(ours)
