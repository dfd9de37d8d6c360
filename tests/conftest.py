"""Shared test helpers: which backends can run here, and per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch

import omnifuse_fast
from omnifuse_fast import _dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tolerances of a fast path against the fp32-accumulating reference, per input dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def fast_backends(device: str = "cpu") -> list[str]:
    """Non-reference backends that can run on ``device`` in this process."""
    return [b for b in omnifuse_fast.available_backends(device) if b != "reference"]


def backend_param(device: str = "cpu"):
    """pytest params for every fast backend, the unavailable ones skipped with the reason."""
    params = []
    for b in ("cpu", "triton", "cuda"):
        reason = _dispatch.unavailable_reason("dwfuse_loss", b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b}: {reason}")] if reason else []
        params.append(pytest.param(b, marks=marks, id=b))
    return params


def assert_close(actual, expected, dtype=torch.float32, msg: str = "") -> None:
    """Compare in fp32 with the dtype's tolerance."""
    if isinstance(actual, (list, tuple)):
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype, msg)
        return
    torch.testing.assert_close(
        actual.float() if actual.is_floating_point() else actual,
        expected.float() if expected.is_floating_point() else expected,
        msg=msg or None,
        **tol(dtype),
    )


@pytest.fixture(autouse=True)
def _value_checks_on():
    """Every test starts with value checks on, whatever an earlier test switched."""
    omnifuse_fast.set_value_checks(True)
    yield
    omnifuse_fast.set_value_checks(True)
