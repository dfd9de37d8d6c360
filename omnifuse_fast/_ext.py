"""Loads the compiled extensions once and says what they provide, and why any did not load.

- ``omnifuse_fast._C``: every op schema and the C++ CPU kernels ("cpu" backend).
- ``omnifuse_fast._C_cuda``: the CUDA kernels ("cuda" backend), loaded after ``_C``; its build is
  optional (setup.py), and the build records why it was skipped in ``_build_info.json``.

Without ``_C`` the package still imports and every op runs on the reference path; the first
time this module is imported without it, one warning says why and how to build. ``status()``
reports both extensions, e.g. ``python -c "import omnifuse_fast._ext as e; print(e.status())"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_MODULE = "omnifuse_fast._C"
CUDA_MODULE = "omnifuse_fast._C_cuda"


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether one compiled extension loaded, and if not, why."""

    module: str
    loaded: bool
    reason: str | None  # None when loaded


def _build_info() -> dict:
    """What setup.py recorded when it built the extensions ({} when it is not there)."""
    try:
        text = (Path(__file__).parent / "_build_info.json").read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, ValueError):
        return {}


def _import(module: str) -> str | None:
    """Imports ``module``; None on success, else the error as text."""
    try:
        importlib.import_module(module)  # runs the TORCH_LIBRARY(_IMPL) registrations
    except Exception as exc:  # ImportError, or an ABI mismatch with the installed torch
        return f"{type(exc).__name__}: {exc}"
    return None


BUILD_INFO: dict = _build_info()
"""setup.py's record of the build: C++ standard, torch, CUDA archs, why CUDA was skipped."""

LOAD_ERROR: str | None = _import(CPU_MODULE)
HAS_EXTENSION: bool = LOAD_ERROR is None

CUDA_LOAD_ERROR: str | None
_cuda_failed_to_load = False  # the .so is there but does not load: worth a warning
if not HAS_EXTENSION:
    CUDA_LOAD_ERROR = f"not loaded because {CPU_MODULE} did not load"
elif importlib.util.find_spec(CUDA_MODULE) is None:
    why = BUILD_INFO.get("cuda_reason") or "no build record says why"
    CUDA_LOAD_ERROR = f"not built ({why})"
else:
    CUDA_LOAD_ERROR = _import(CUDA_MODULE)
    _cuda_failed_to_load = CUDA_LOAD_ERROR is not None

EXTENSIONS: dict[str, ExtensionStatus] = {
    CPU_MODULE: ExtensionStatus(CPU_MODULE, HAS_EXTENSION, LOAD_ERROR),
    CUDA_MODULE: ExtensionStatus(CUDA_MODULE, CUDA_LOAD_ERROR is None, CUDA_LOAD_ERROR),
}
"""Every compiled extension: loaded or not, and why not."""


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``omnifuse_fast::op`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"omnifuse_fast::{op}", dispatch_key)


CPU_ONLY_OPS: tuple[str, ...] = (
    "cra_forward_stash",
    "cra_backward_stash",
    "soft_cross_entropy_backward_logits",
    "soft_cross_entropy_grad",
)
"""Schemas with CPU kernels only: the autograd formulas call them for CPU tensors alone."""

HAS_CPU_KERNELS: bool = has_kernel("dwfuse_loss", "CPU")
HAS_CUDA_KERNELS: bool = has_kernel("dwfuse_loss", "CUDA")


def status() -> str:
    """One line per compiled extension: loaded, or why not; then the build record."""
    lines = []
    for ext in EXTENSIONS.values():
        state = "loaded" if ext.loaded else f"NOT loaded: {ext.reason}"
        lines.append(f"{ext.module}: {state}")
    if BUILD_INFO:
        keys = ("torch", "cxx_std", "nvcc", "archs", "arch_source")
        lines.append("build: " + ", ".join(f"{k}={BUILD_INFO[k]}" for k in keys if k in BUILD_INFO))
    return "\n".join(lines)


if not HAS_EXTENSION:
    warnings.warn(
        "omnifuse_fast: the compiled extension is not available, so the 'cpu' and 'cuda' "
        f"backends are off and ops run on the reference path ({LOAD_ERROR}). Build it with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
elif _cuda_failed_to_load or (BUILD_INFO.get("cuda_attempted") and not HAS_CUDA_KERNELS):
    # The install wanted the CUDA kernels and has none: say so once (a deliberate or
    # GPU-less CPU install stays quiet; status() has the details either way).
    warnings.warn(
        f"omnifuse_fast: the CUDA kernels are not available, so the 'cuda' backend is off "
        f"({CUDA_MODULE} {CUDA_LOAD_ERROR}); 'triton', 'cpu' and 'reference' still work. Fix "
        "the cause and reinstall, or set OMNIFUSE_FAST_SKIP_CUDA=1 when installing to not "
        "build them.",
        RuntimeWarning,
        stacklevel=2,
    )
