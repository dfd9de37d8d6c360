"""Small helpers shared by the compiled-op family modules."""

from __future__ import annotations

import torch

NAMESPACE = "omnifuse_fast"


def qualname(name: str) -> str:
    """``"omnifuse_fast::name"``: the qualified name of a custom op of csrc/ops.cpp."""
    return f"{NAMESPACE}::{name}"


def zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The incoming gradient, or zeros like ``like`` when autograd passes ``None``."""
    return torch.zeros_like(like) if grad is None else grad
