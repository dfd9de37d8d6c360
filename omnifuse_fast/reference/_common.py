"""Shared by the reference files: the accumulation dtype (SPEC: at least fp32)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (never lower the input's precision)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (a no-op for fp32 and fp64)."""
    return t.to(acc_dtype(t.dtype))
