"""Loads the compiled extension (``omnifuse_fast._C``) once and says what it provides.

Without it the package still imports and every op runs on the reference path; the first
time this module is imported without the extension, one warning says why and how to build.
"""

from __future__ import annotations

import importlib
import warnings

import torch

LOAD_ERROR: str | None = None
try:
    # registers the ops under torch.ops.omnifuse_fast
    importlib.import_module("omnifuse_fast._C")
except Exception as exc:  # ImportError, or an ABI mismatch with the installed torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``omnifuse_fast::op`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"omnifuse_fast::{op}", dispatch_key)


HAS_CPU_KERNELS: bool = has_kernel("dwfuse_loss", "CPU")
HAS_CUDA_KERNELS: bool = has_kernel("dwfuse_loss", "CUDA")

if not HAS_EXTENSION:
    warnings.warn(
        "omnifuse_fast: the compiled extension is not available, so the 'cpu' and 'cuda' "
        f"backends are off and ops run on the reference path ({LOAD_ERROR}). Build it with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
