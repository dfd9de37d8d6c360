"""The package imports with or without its compiled extension, and exports SPEC section 8."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import omnifuse_fast
from omnifuse_fast import _dispatch

REPO = pathlib.Path(__file__).resolve().parents[1]

FUNCTIONS = (*_dispatch.OPS, "set_value_checks")
MODULES = (
    "CascadeResidualAutoencoder",
    "OmniFuseImputer",
    "DWFuseLoss",
    "TLAMiner",
    "ModalityMixer",
    "MIMOBalancer",
    "OmniFuse",
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_plain_import_in_a_fresh_interpreter():
    proc = _python("import omnifuse_fast as o; print(o.dwfuse_loss)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dwfuse_loss" in proc.stdout


def test_import_without_the_extension_warns_once_and_runs_reference():
    code = textwrap.dedent(
        """
        import importlib.abc, json, sys, warnings

        class BlockExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "omnifuse_fast._C":
                    raise ImportError("blocked by the test")
                return None

        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import omnifuse_fast as of
            import omnifuse_fast  # a second import: no second warning
            from omnifuse_fast import _dispatch, _ext, reference
            z = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
            y = torch.tensor([0, 3, 1])
            auto = of.dwfuse_loss(z, y)
            ref = reference.dwfuse_loss(z, y)
            backends = of.available_backends("cpu")
            try:
                of.dwfuse_loss(z, y, backend="cpu")
                cpu_error = None
            except RuntimeError as exc:
                cpu_error = str(exc)
            of.tla_loss(z[:, 0], y, torch.tensor([1, 2, 3]), 3)
        runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(json.dumps(dict(
            runtime=runtime, has_ext=_ext.HAS_EXTENSION, equal=bool(torch.equal(auto, ref)),
            backends=backends, cpu_error=cpu_error,
            impl=_dispatch.resolve("dwfuse_loss", "auto", torch.device("cpu")).impl.__module__,
        )))
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["has_ext"] is False
    assert len(out["runtime"]) == 1, out["runtime"]  # exactly one warning
    msg = out["runtime"][0]
    assert "compiled extension is not available" in msg and "reference" in msg
    assert "blocked by the test" in msg and "pip install" in msg  # why, and how to fix
    assert out["backends"] == ["reference"]
    assert out["equal"] and out["impl"] == "omnifuse_fast.reference.dwfuse"
    assert out["cpu_error"] and "'cpu'" in out["cpu_error"] and "not built" in out["cpu_error"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_api_exported(name):
    obj = getattr(omnifuse_fast, name)
    assert callable(obj)
    assert obj.__doc__, f"{name} needs a docstring"
    if name != "set_value_checks":
        assert "backend" in obj.__code__.co_varnames[: obj.__code__.co_argcount]
        assert obj.__defaults__[-1] == "auto"


def test_functional_api_importable_by_name():
    ns: dict = {}
    exec(f"from omnifuse_fast import {', '.join(FUNCTIONS)}", ns)
    assert all(name in ns for name in FUNCTIONS)
    assert set(FUNCTIONS) <= set(omnifuse_fast.__all__)


@pytest.mark.parametrize("name", MODULES)
def test_module_api_exported(name):
    obj = getattr(omnifuse_fast, name, None)
    assert obj is not None, f"omnifuse_fast.{name} (SPEC section 8) is not exported"
    assert isinstance(obj, type) and issubclass(obj, torch.nn.Module)
    assert name in omnifuse_fast.__all__
