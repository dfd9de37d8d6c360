"""Builds the optional compiled extension ``omnifuse_fast._C``.

- C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) whenever torch is importable.
- CUDA kernels (csrc/cuda/*.cu) only with a CUDA build of torch and nvcc on the machine.

Environment switches (as in flash-attention and pytorch/extension-cpp):
  OMNIFUSE_FAST_SKIP_EXT=1     build no extension (pure-Python install; reference path only)
  OMNIFUSE_FAST_FORCE_CUDA=1   build the CUDA kernels even when no GPU is visible
  OMNIFUSE_FAST_SKIP_CUDA=1    never build the CUDA kernels
  OMNIFUSE_FAST_CUDA_ARCHS     e.g. "90" (default) or "80;90"
  OMNIFUSE_FAST_DEBUG=1        -O0 -g
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("OMNIFUSE_FAST_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("omnifuse_fast: torch is not importable; building without the extension")
        return [], {}

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    debug = _flag("OMNIFUSE_FAST_DEBUG")
    # -fno-trapping-math: FP exceptions are never trapped, so branchy selects in the CPU
    # kernels' row loops (csrc/cpu/common.h vexp_neg) can be if-converted and vectorized
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fopenmp", "-fno-trapping-math"]
    cxx += ["-std=c++17"]
    extra_link = ["-fopenmp"] if not debug else []

    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    want_cuda = not _flag("OMNIFUSE_FAST_SKIP_CUDA") and (
        _flag("OMNIFUSE_FAST_FORCE_CUDA")
        or (torch.version.cuda is not None and torch.cuda.is_available())
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if want_cuda and has_nvcc and torch.version.cuda is not None and cuda_sources:
        archs = os.environ.get("OMNIFUSE_FAST_CUDA_ARCHS", "90").replace(",", ";").split(";")
        # No --use_fast_math: the exact log-space statistics rely on accurate expf/logf/log1pf
        # (and on denormals not being flushed); the kernels are bandwidth-bound anyway.
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "-DNDEBUG"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        ext = cpp_extension.CUDAExtension(
            "omnifuse_fast._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "omnifuse_fast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
