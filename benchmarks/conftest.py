"""pytest setup of the benchmark suite (``pytest benchmarks --benchmark-only``).

Collects ``bench_*.py`` (pyproject's ``python_files`` only names tests), writes the versions
and the device into the JSON's ``machine_info``, and restores value checks after every case.
The harness itself (providers, sizes, floors) is ``_harness.py``.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

import omnifuse_fast


def pytest_collect_file(file_path, parent):
    # Explicit paths (`pytest benchmarks/bench_cra.py`) are collected by pytest already.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    threads = os.environ.get("OMNIFUSE_BENCH_THREADS")
    if threads:  # e.g. 1 on a busy machine, where a descheduled OpenMP thread stalls a kernel
        torch.set_num_threads(int(threads))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _environment() -> dict:
    from _harness import DEVICE, PROVIDERS, SIZE, device_name, provider_reason

    return {
        "omnifuse_fast": omnifuse_fast.__version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(DEVICE),
        "device_name": device_name(DEVICE),
        "cpu_threads": torch.get_num_threads(),
        "size": SIZE,
        "providers": {p: provider_reason("dwfuse_loss", p) or "available" for p in PROVIDERS},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["omnifuse_fast"] = _environment()


def pytest_report_header(config):
    env = _environment()
    providers = ", ".join(f"{p}: {r}" for p, r in env["providers"].items())
    return [
        f"omnifuse_fast bench: size={env['size']} device={env['device']} "
        f"({env['device_name']}), torch {env['torch']}, triton {env['triton']}",
        f"providers (for dwfuse_loss): {providers}",
    ]


@pytest.fixture(autouse=True)
def _value_checks_restored():
    """A case sets value checks as it needs; the next one starts from the default (on)."""
    yield
    omnifuse_fast.set_value_checks(True)
