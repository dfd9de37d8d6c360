"""The "triton" backend: Triton kernels exposed through torch.library.triton_op."""

from __future__ import annotations

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
