"""The build logic of setup.py and the GPU check scripts, on CPU.

- The C++ standard follows the installed torch; GPU arch lists become -gencode flags with PTX of
  the highest arch; the toolkit and the CUDA library headers are found or the cause is named.
- A failing CUDA compile leaves the CPU extension built and one message naming the cause and
  OMNIFUSE_FAST_SKIP_CUDA (a toy build with gcc: seconds, not the real kernels' minutes).
- ``omnifuse_fast._ext`` reports every extension; ``scripts/gpu_check.sh --dry-run`` lists every
  step; the sanitizer driver calls every op (on the CPU backends here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = _load(ROOT / "setup.py", "omnifuse_setup")  # functions only: setup() runs as __main__
tools = _load(ROOT / "scripts" / "gpu_check_tools.py", "gpu_check_tools")


# ---------------------------------------------------------------------------- C++ standard
def test_cxx_std_follows_the_installed_torch(monkeypatch):
    monkeypatch.delenv("OMNIFUSE_FAST_CXX_STD", raising=False)
    std = setup_py.cxx_std()
    aten = (Path(torch.__file__).parent / "include" / "ATen" / "ATen.h").read_text()
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if "C++20 or later" in aten or (major, minor) >= (2, 13):
        assert std == "c++20"
    else:
        assert std in ("c++17", "c++20")
    monkeypatch.setenv("OMNIFUSE_FAST_CXX_STD", "17")
    assert setup_py.cxx_std() == "c++17"


# ------------------------------------------------------------------------------- GPU archs
@pytest.mark.parametrize(
    "text, archs, ptx",
    [
        ("8.0;9.0", ["80", "90"], {"90"}),
        ("9.0 8.0", ["80", "90"], {"90"}),
        ("90", ["90"], {"90"}),
        ("8.0+PTX,9.0", ["80", "90"], {"80", "90"}),
        ("9.0a", ["90a"], {"90"}),  # arch-specific SASS; the family's PTX
        ("Hopper", ["90"], {"90"}),
        ("sm_120", ["120"], {"120"}),
    ],
)
def test_arch_list_becomes_gencode_with_ptx_of_the_highest(text, archs, ptx):
    got_archs, asked_ptx = setup_py.parse_arch_list(text)
    assert got_archs == archs
    flags = setup_py.gencode_flags(got_archs, asked_ptx)
    assert [f for f in flags if "code=sm_" in f] == [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs
    ]
    assert {f.split("code=compute_")[1] for f in flags if "code=compute_" in f} == ptx


@pytest.mark.parametrize("text", ["", "9.x", "ampere-ish"])
def test_bad_arch_list_names_the_entry(text):
    with pytest.raises(setup_py.CudaSkip, match="arch"):
        setup_py.parse_arch_list(text)


def test_arch_choice_order(monkeypatch):
    monkeypatch.delenv("OMNIFUSE_FAST_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_py.choose_archs([]) == ("8.0;9.0", "the default (no GPU visible)")
    assert setup_py.choose_archs([(9, 0), (8, 6), (9, 0)])[0] == "8.6;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9+PTX")
    assert setup_py.choose_archs([(9, 0)]) == ("8.9+PTX", "TORCH_CUDA_ARCH_LIST")
    monkeypatch.setenv("OMNIFUSE_FAST_CUDA_ARCHS", "100")
    assert setup_py.choose_archs([(9, 0)]) == ("100", "OMNIFUSE_FAST_CUDA_ARCHS")


# ------------------------------------------------------------------------------- toolkit
def _fake_nvcc(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + body + "\n")
    nvcc.chmod(0o755)
    return nvcc


def test_cuda_home_skips_a_wrapper_without_headers(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    wrapper = tmp_path / "wrapper"  # like /usr/local/bin/nvcc: a script, no toolkit beside it
    _fake_nvcc(wrapper / "bin", "exit 0")
    real = tmp_path / "cuda"
    _fake_nvcc(real / "bin", "exit 0")
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("PATH", f"{wrapper / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert setup_py.find_cuda_home(str(wrapper)) in (str(real), "/usr/local/cuda")
    assert setup_py.find_cuda_home(str(real)) == str(real)


def test_explicit_cuda_home_without_nvcc_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(setup_py.CudaSkip, match="has no bin/nvcc"):
        setup_py.find_cuda_home(None)


def test_failing_nvcc_is_named(tmp_path):
    _fake_nvcc(tmp_path / "bin", "echo 'nvcc fatal : broken on purpose' >&2; exit 1")
    with pytest.raises(setup_py.CudaSkip, match="exit code 1: nvcc fatal : broken on purpose"):
        setup_py.nvcc_version(str(tmp_path))
    _fake_nvcc(tmp_path / "bin", "echo 'Cuda compilation tools, release 12.8, V12.8.93'")
    assert setup_py.nvcc_version(str(tmp_path)) == "12.8"


def test_missing_library_headers_come_from_pip_nvidia_packages(tmp_path):
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cusolverDn.h").write_text("")
    site = tmp_path / "site-packages"
    pip_inc = site / "nvidia" / "cu13" / "include"
    pip_inc.mkdir(parents=True)
    for header in ("cublas_v2.h", "cublasLt.h"):
        (pip_inc / header).write_text("")
    with pytest.raises(setup_py.CudaSkip, match="cusparse.h"):
        setup_py.library_header_dirs(str(home), str(site))
    (pip_inc / "cusparse.h").write_text("")
    assert setup_py.library_header_dirs(str(home), str(site)) == [str(pip_inc)]
    for header in setup_py.TORCH_CUDA_LIB_HEADERS:
        (home / "include" / header).write_text("")
    assert setup_py.library_header_dirs(str(home), str(site)) == []  # the toolkit's come first


def test_cpu_extension_compiles_without_the_cuda_include_dirs(monkeypatch):
    """_C gets no CUDA toolkit flags: its objects do not depend on CUDA_HOME, and a CUDA build
    reuses them (torch's Extension helpers append to the include list they are given)."""
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not Path(home, "bin", "nvcc").exists():
        pytest.skip("needs a CUDA toolkit (nvcc) to make the CUDA extension")
    monkeypatch.setenv("CUDA_HOME", home)  # restored after: use_cuda_home sets both
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setenv("OMNIFUSE_FAST_FORCE_CUDA", "1")
    for name in ("OMNIFUSE_FAST_SKIP_CUDA", "OMNIFUSE_FAST_SKIP_EXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    exts = {e.name: e for e in setup_py._extensions()[0]}
    assert set(exts) == {setup_py.CPU_EXT, setup_py.CUDA_EXT}
    cpu_dirs, cuda_dirs = exts[setup_py.CPU_EXT].include_dirs, exts[setup_py.CUDA_EXT].include_dirs
    assert not [d for d in cpu_dirs if d.startswith(home)], cpu_dirs
    assert len(cpu_dirs) == len(set(cpu_dirs)), cpu_dirs
    assert any(d.startswith(home) for d in cuda_dirs), cuda_dirs
    # a broken nvcc fails on the first .cu before module.cpp's slow host compile
    assert exts[setup_py.CUDA_EXT].sources[-1].endswith("module.cpp")


# ------------------------------------------------------- a failing CUDA build is not fatal
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_failing_cuda_compile_leaves_the_cpu_extension(tmp_path, monkeypatch, capfd):
    """The real build_ext subclass on two toy extensions: _C compiles, _C_cuda does not."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    module = 'static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, "%s", 0, -1, 0};\n'
    (tmp_path / "cpu.c").write_text(
        "#include <Python.h>\n" + module % "_C" + "PyObject* PyInit__C(void) "
        "{ return PyModule_Create(&d); }\n"
    )
    (tmp_path / "cuda.c").write_text("this is not C;\n")
    exts = [
        Extension(setup_py.CPU_EXT, [str(tmp_path / "cpu.c")]),
        Extension(setup_py.CUDA_EXT, [str(tmp_path / "cuda.c")], extra_compile_args={}),
    ]
    monkeypatch.setattr(setup_py, "configure_cuda", lambda ext: {"archs": ["90"]})
    monkeypatch.chdir(tmp_path)
    dist = Distribution({"name": "toy", "ext_modules": exts})
    cmd = setup_py._make_build_ext(build_ext, None, None)(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    out = capfd.readouterr().out
    pkg = tmp_path / "lib" / "omnifuse_fast"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert (pkg / f"_C{suffix}").exists()
    assert not list(pkg.glob("_C_cuda*"))
    assert [e.name for e in cmd.extensions] == [setup_py.CPU_EXT]  # nothing to install for it
    assert out.count("the CUDA kernels are NOT built") == 1
    assert "compiling csrc/cuda failed" in out and "OMNIFUSE_FAST_SKIP_CUDA=1" in out
    info = json.loads((pkg / setup_py.BUILD_INFO).read_text())
    assert info["cuda_built"] is False and info["cuda_attempted"] is True
    assert "compiling csrc/cuda failed" in info["cuda_reason"]
    assert info["torch"] == torch.__version__ and info["cxx_std"].startswith("c++")


def test_cpu_only_torch_forced_cuda_names_the_cause(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("needs a CPU-only torch")

    class Ext:
        extra_compile_args = {"nvcc": []}

    with pytest.raises(setup_py.CudaSkip, match="CPU-only build"):
        setup_py.configure_cuda(Ext())


# ------------------------------------------------------------------------------ _ext report
def test_ext_reports_every_extension():
    from omnifuse_fast import _ext

    assert set(_ext.EXTENSIONS) == {"omnifuse_fast._C", "omnifuse_fast._C_cuda"}
    assert _ext.EXTENSIONS["omnifuse_fast._C"].loaded == _ext.HAS_EXTENSION
    cuda = _ext.EXTENSIONS["omnifuse_fast._C_cuda"]
    assert cuda.loaded == (cuda.reason is None)
    if cuda.loaded:
        assert _ext.HAS_CUDA_KERNELS
    text = _ext.status()
    assert "omnifuse_fast._C:" in text and "omnifuse_fast._C_cuda:" in text
    assert cuda.loaded or cuda.reason in text  # and why not


# ------------------------------------------------------------------------- GPU check scripts
def test_gpu_check_dry_run_lists_every_step(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (
        "OMNIFUSE_FAST_FORCE_CUDA=1",
        "pip install",
        "pytest -m gpu",
        "OMNIFUSE_EXPECT_BACKENDS=cpu,triton,cuda",
        "compute-sanitizer --tool memcheck",
        "gpu_sanitize_driver.py --device cuda --backends cuda,triton",
        "OMNIFUSE_BENCH_LARGE=1",
        "--benchmark-only",
        "summary",
    ):
        assert needle in out, needle
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def _driver_env() -> dict[str, str]:
    """The child imports the same omnifuse_fast as this process (source tree or installed)."""
    import omnifuse_fast

    return {**os.environ, "PYTHONPATH": str(Path(omnifuse_fast.__file__).parents[1])}


def test_sanitizer_driver_calls_every_op_on_cpu():
    from omnifuse_fast import available_backends

    backends = ",".join(b for b in ("cpu", "reference") if b in available_backends("cpu"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_sanitize_driver.py"), "--device", "cpu"]
        + ["--backends", backends],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=_driver_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["uncovered"] == []
    assert set(result["calls"]) == set(backends.split(","))


def test_sanitizer_driver_fails_on_an_unavailable_backend():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_sanitize_driver.py"), "--device", "cpu"]
        + ["--backends", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=_driver_env(),
    )
    assert proc.returncode == 1
    assert "cuda" in json.loads(proc.stdout.strip().splitlines()[-1])["unavailable"]


def test_bench_subset_takes_one_fwd_bwd_case_per_benchmark():
    ids = [
        f"benchmarks/bench_a.py::test_a[{case}-{p}]"
        for case in ("B1-fp32-fwd", "B1-fp32-fwd_bwd", "B2-fp32-fwd_bwd")
        for p in ("reference", "compile", "cpu", "triton", "cuda")
    ] + [f"benchmarks/bench_b.py::test_b[B9-fwd-{p}]" for p in ("reference", "cuda")]
    got = tools.select_cases(ids, ["reference", "triton", "cuda"])
    assert got == [
        "benchmarks/bench_a.py::test_a[B1-fp32-fwd_bwd-reference]",
        "benchmarks/bench_a.py::test_a[B1-fp32-fwd_bwd-triton]",
        "benchmarks/bench_a.py::test_a[B1-fp32-fwd_bwd-cuda]",
        "benchmarks/bench_b.py::test_b[B9-fwd-reference]",
        "benchmarks/bench_b.py::test_b[B9-fwd-cuda]",
    ]


def test_summary_table_fails_unless_every_step_passed(tmp_path, capsys):
    (tmp_path / "steps.txt").write_text("build ok 120\npytest FAILED(rc=1) 30\n")
    (tmp_path / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    assert tools.summary(tmp_path, 150) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith(f"SOME STEPS FAILED in 150s ({tmp_path})")
    assert "| pytest | FAILED(rc=1) | 30 |" in out
    (tmp_path / "steps.txt").write_text("build ok 120\nsanitizer ok 40\n")
    assert tools.summary(tmp_path, 160) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["steps"][1]["detail"] == "memcheck: 0 errors"


def test_check_install_agrees_with_what_loaded():
    from omnifuse_fast import _ext

    if not _ext.HAS_EXTENSION:
        pytest.fail(f"the compiled extension did not load: {_ext.LOAD_ERROR}")
    mode = "--expect-cuda" if _ext.HAS_CUDA_KERNELS else "--expect-no-cuda"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_install.py"), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=_driver_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "the cpu backend runs" in proc.stdout
