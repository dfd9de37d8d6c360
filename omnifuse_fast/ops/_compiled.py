"""The "cpu" and "cuda" backends: the compiled custom ops of csrc/ (torch.ops.omnifuse_fast).

Imported lazily by the dispatcher the first time one of these backends is asked for.
"""

from __future__ import annotations

import torch

from omnifuse_fast import _dispatch, _ext


def _cpu_reason(device: torch.device) -> str | None:
    if not _ext.HAS_EXTENSION:
        return f"the compiled extension is not built ({_ext.LOAD_ERROR})"
    if not _ext.HAS_CPU_KERNELS:
        return "the compiled extension has no CPU kernels"
    if device.type != "cpu":
        return f"it runs on CPU tensors, got tensors on {device}"
    return None


def _cuda_reason(device: torch.device) -> str | None:
    if not _ext.HAS_EXTENSION:
        return f"the compiled extension is not built ({_ext.LOAD_ERROR})"
    if not _ext.HAS_CUDA_KERNELS:
        return "the extension was built without CUDA kernels (needs a CUDA torch and nvcc)"
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got tensors on {device}"
    return None


_dispatch.set_availability("cpu", _cpu_reason)
_dispatch.set_availability("cuda", _cuda_reason)
