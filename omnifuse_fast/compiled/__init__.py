"""The "cpu" and "cuda" backends: the compiled custom ops of csrc/ (``torch.ops.omnifuse_fast``).

Imported lazily by the dispatcher the first time one of these backends is asked for. It says
when each backend can run (:func:`_cpu_reason`, :func:`_cuda_reason`) and, when the extension is
loaded, imports one module per op family (``cra``, ``dwfuse``, ``tla``, ``mix``, ``mimo``,
named as in ``_dispatch.OPS``). Each family module registers at import, at module level:

- the fake (meta) impl of each of its custom ops, so ``torch.compile`` traces them;
- the autograd formula of each differentiable op, whose backward calls the registered
  ``*_backward`` op (itself a custom op, so the backward graph is traceable too);

and this package then registers each public op of ``_dispatch.OPS`` from its family's module
for both the "cpu" and "cuda" backends (the kernel for the tensors' device is picked by
PyTorch's dispatcher).
"""

from __future__ import annotations

import importlib

import torch

from omnifuse_fast import _dispatch, _ext

BACKENDS: tuple[str, ...] = ("cpu", "cuda")
"""The dispatcher backends this package serves."""


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
        # _ext says why: not built (and the build's reason), or the .so failed to load
        why = _ext.CUDA_LOAD_ERROR or "loaded but registered no kernels"
        return f"the CUDA kernels are not available ({_ext.CUDA_MODULE} {why})"
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got tensors on {device}"
    return None


_dispatch.set_availability("cpu", _cpu_reason)
_dispatch.set_availability("cuda", _cuda_reason)


def _register_public_ops() -> None:
    for op, family in _dispatch.OPS.items():
        impl = getattr(importlib.import_module(f"{__name__}.{family}"), op)
        for backend in BACKENDS:
            _dispatch.register(op, backend, impl)


if _ext.HAS_EXTENSION:  # else the availability checks above say why
    _register_public_ops()
