"""Suite-wide hooks: expected backends must be there, the ``backend`` marker, value checks on.

The helpers (tolerances, comparison against the reference) live in ``tests/_harness.py``; the
names below are re-exported for the modules that import them from here.
"""

from __future__ import annotations

import pytest
from _harness import (  # noqa: F401  (re-exported)
    DTYPES,
    EXPECT_ENV,
    TOLERANCES,
    assert_close,
    missing_expected,
    require_backend,
    tol,
)

import omnifuse_fast


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backend(name, device='cpu'): needs this backend; skipped where it cannot run, "
        f"failed instead when {EXPECT_ENV} names it",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """A backend that ``OMNIFUSE_EXPECT_BACKENDS`` names but that is missing, or failed to
    load, fails the run before any test, saying why (instead of its tests skipping)."""
    missing = missing_expected()
    if missing:
        lines = "\n".join(f"  {b}: {reason}" for b, reason in missing.items())
        pytest.exit(
            f"{EXPECT_ENV} expects backends that cannot run here:\n{lines}",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("backend"):
        require_backend(*mark.args, **mark.kwargs)


@pytest.fixture(autouse=True)
def _value_checks_on():
    """Every test starts with value checks on, whatever an earlier test switched."""
    omnifuse_fast.set_value_checks(True)
    yield
    omnifuse_fast.set_value_checks(True)
