"""Which CRA inputs the fused CUDA kernel takes, decided in Python before the op is called.

The kernel (csrc/cuda/cra.cuh, ``unsupported``) takes fp32/bf16/fp16 with F and H multiples of
16, F <= 1024, H <= 256, 32-byte aligned tensors, and a row tile that fits the device's shared
memory. Other inputs used to run an ATen composite inside the C++ op after a one-time warning,
so a run could not tell which path it took. Registered as a dispatcher guard, this check sends
them to the reference (the same fp32-accumulating chain) through ``_dispatch.fallback``, which
records it. The C++ composite stays for direct ``torch.ops`` calls, and warns on every call.
"""

from __future__ import annotations

import torch

from omnifuse_fast import _dispatch

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_F, MAX_H, ROWS, WARPS = 1024, 256, 16, 8  # kMaxF, kMaxH, kRows, kWarps of cra.cuh
_optin: dict[int, int | None] = {}  # device index -> shared memory a block may opt in to


def _round128(n: int) -> int:
    return (n + 127) & ~127


def smem_bytes(feat: int, hidden: int, elem_bytes: int) -> int:
    """Shared memory of one row tile: ``smem_plan`` of cra.cuh (mma for 2-byte types)."""
    mma = elem_bytes == 2
    ld_s, ld_c = feat + 4, hidden + 4
    ld_sh, ld_ch = (feat + 8, hidden + 8) if mma else (0, 0)
    ksplit = min(max(WARPS // (hidden // 16), 1), feat // 16) if mma else 1
    off = _round128(4 * ROWS * ld_s)
    off = _round128(off + elem_bytes * ROWS * ld_sh)
    off = _round128(off + 4 * ksplit * ROWS * ld_c)
    return _round128(off + elem_bytes * ROWS * ld_ch)


def _smem_optin(device: torch.device) -> int | None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _optin:
        props = torch.cuda.get_device_properties(index)
        _optin[index] = getattr(props, "shared_memory_per_block_optin", None)
    return _optin[index]


def _misaligned(t: torch.Tensor) -> bool:
    # the op makes every input contiguous: only a contiguous view at an odd offset stays so
    return t.is_contiguous() and (t.storage_offset() * t.element_size()) % 32 != 0


def fused_reason(x, w1, b1, w2, b2, activation="relu") -> str | None:
    """Why the fused CUDA CRA kernel cannot take these (validated) inputs; ``None`` if it can."""
    if x.dtype not in _FUSED_DTYPES:
        return f"the fused CRA kernel takes fp32, bf16 and fp16 only, got {x.dtype}"
    feat, (_, hidden, _) = x.shape[1], w1.shape
    if feat % 16 or hidden % 16:
        return f"F and H must be multiples of 16 for the fused CRA kernel, got F={feat}, H={hidden}"
    if feat > MAX_F or hidden > MAX_H:
        return f"the fused CRA kernel takes F <= {MAX_F} and H <= {MAX_H}, got F={feat}, H={hidden}"
    if any(_misaligned(t) for t in (x, w1, w2)):
        return "a CRA tensor is not 32-byte aligned (a storage offset)"
    optin = _smem_optin(x.device)
    need = smem_bytes(feat, hidden, x.element_size())
    if optin is not None and need > optin:
        return f"the row tile needs {need} bytes of shared memory, the device allows {optin}"
    return None


_dispatch.register_guard("cra_forward", "cuda", fused_reason)
