"""The "triton" backend: Triton kernels exposed through torch.library.triton_op.

Importing this package registers every op's Triton implementation with the dispatcher (one
module per op family; MIMO's pointer-table kernels are opaque custom ops, see ``mimo.py``).
Kernels run compiled on CUDA tensors, or in the Triton interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set at call time (for tests without a GPU; see ``_common.py``).
"""

from __future__ import annotations

import importlib.util

import torch

from omnifuse_fast import _dispatch


def _reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _dispatch.triton_interpret():
        return None
    return f"it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"


_dispatch.set_availability("triton", _reason)

if importlib.util.find_spec("triton") is not None:  # else _reason says why
    from omnifuse_fast.triton import cra, dwfuse, mimo, mix, tla  # noqa: F401  (registers their ops)
