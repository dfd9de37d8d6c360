"""Builds the optional compiled extensions of omnifuse_fast against the installed torch.

- ``omnifuse_fast._C``: every op schema (csrc/ops.cpp) and the C++ CPU kernels (csrc/cpu/).
- ``omnifuse_fast._C_cuda``: the CUDA kernels (csrc/cuda/), a separate module loaded after _C.
  Its build is never fatal: when the toolkit is missing, mismatched or nvcc fails, the install
  continues with _C (CPU kernels, Triton and the reference path still work), one message names
  the cause, and ``omnifuse_fast._ext.status()`` reports it at run time.

Environment switches (README "Build switches"):
  OMNIFUSE_FAST_SKIP_EXT=1     build no extension (pure-Python install; reference path only)
  OMNIFUSE_FAST_SKIP_CUDA=1    never build the CUDA kernels
  OMNIFUSE_FAST_FORCE_CUDA=1   build the CUDA kernels even when no GPU is visible
  OMNIFUSE_FAST_CUDA_ARCHS     GPU archs, e.g. "90" or "8.0;9.0" (wins over TORCH_CUDA_ARCH_LIST)
  TORCH_CUDA_ARCH_LIST         GPU archs as torch spells them, e.g. "8.0;9.0+PTX"
                               (neither set: the visible GPUs' archs, else 8.0 and 9.0; the PTX
                               of the highest arch is always embedded so newer GPUs can JIT it)
  OMNIFUSE_FAST_CXX_STD        e.g. "c++20"; default: the standard the installed torch requires
  OMNIFUSE_FAST_DEBUG=1        -O0 -g
  CUDA_HOME / CUDA_PATH        the CUDA toolkit (default: found from nvcc, else /usr/local/cuda)
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_EXT = "omnifuse_fast._C"
CUDA_EXT = "omnifuse_fast._C_cuda"
BUILD_INFO = "_build_info.json"  # written beside the extensions; read by omnifuse_fast/_ext.py
DEFAULT_ARCHS = "8.0;9.0"
# Headers of CUDA libraries that torch's ATen CUDA headers include (ATen/cuda/CUDAContextLight.h).
TORCH_CUDA_LIB_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")
# torch's named archs (torch.utils.cpp_extension), the ones current toolkits still build.
NAMED_ARCHS = {
    "turing": "7.5+PTX",
    "ampere": "8.0;8.6+PTX",
    "ada": "8.9+PTX",
    "hopper": "9.0+PTX",
    "blackwell": "10.0;12.0+PTX",
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


class CudaSkip(Exception):
    """Why the CUDA kernels cannot be built here (the message names the cause)."""


# ------------------------------------------------------------------------- C++ standard
def cxx_std() -> str:
    """The C++ standard of the build: the one the installed torch builds extensions with.

    torch 2.14's ATen refuses anything below C++20; torch 2.13's cpp_extension already defaults
    extensions to C++20; older releases use C++17. Read from torch itself, not its version."""
    forced = os.environ.get("OMNIFUSE_FAST_CXX_STD")
    if forced:
        return forced if forced.startswith("c++") else f"c++{forced}"
    import torch
    from torch.utils import cpp_extension

    include = os.path.join(os.path.dirname(torch.__file__), "include")
    for header in ("ATen/ATen.h", "c10/macros/Macros.h"):
        path = os.path.join(include, header)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                if re.search(r"C\+\+(20|2a) or later", f.read()):
                    return "c++20"
    # the standard torch appends when an extension names none (BuildExtension)
    with open(cpp_extension.__file__, encoding="utf-8") as f:
        found = re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", f.read())
    if found:
        return max(found, key=lambda s: int(s[3:]))
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return "c++20" if (major, minor) >= (2, 13) else "c++17"


# ------------------------------------------------------------------------------- GPU archs
def parse_arch_list(text: str) -> tuple[list[str], set[str]]:
    """``"8.0;9.0+PTX"`` -> (["80", "90"], {"90"}): SASS archs, and archs asked for as PTX.

    Accepts torch's spelling (``8.0``, ``9.0a``, ``+PTX``, ``Hopper``) and nvcc's (``90``,
    ``sm_90``), separated by ``;``, ``,`` or spaces."""
    archs: list[str] = []
    ptx: set[str] = set()
    for token in re.split(r"[;,\s]+", text.strip()):
        if not token:
            continue
        named = NAMED_ARCHS.get(token.lower().split("+")[0])
        if named is not None:
            sub_archs, sub_ptx = parse_arch_list(named)
            archs += [a for a in sub_archs if a not in archs]
            ptx |= sub_ptx
            continue
        want_ptx = token.upper().endswith("+PTX")
        core = token[:-4] if want_ptx else token
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([a-z]?)", core)
        if m is None:
            raise CudaSkip(f"'{token}' is not a GPU arch like 9.0 or 90 (in '{text}')")
        arch = m.group(1) + (m.group(2) or "") + m.group(3)
        if arch not in archs:
            archs.append(arch)
        if want_ptx:
            ptx.add(arch)
    if not archs:
        raise CudaSkip(f"the arch list '{text}' is empty")
    return sorted(archs, key=_arch_number), ptx


def _arch_number(arch: str) -> int:
    return int(re.match(r"\d+", arch).group(0))


def choose_archs(visible: list[tuple[int, int]]) -> tuple[str, str]:
    """(arch list, where it came from): OMNIFUSE_FAST_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST,
    else the visible GPUs' compute capabilities, else the default list."""
    for name in ("OMNIFUSE_FAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if os.environ.get(name, "").strip():
            return os.environ[name], name
    if visible:
        return ";".join(sorted({f"{a}.{b}" for a, b in visible})), "the visible GPUs"
    return DEFAULT_ARCHS, "the default (no GPU visible)"


def gencode_flags(archs: list[str], ptx: set[str]) -> list[str]:
    """SASS for every arch, plus PTX for the highest one (and any asked-for ``+PTX``) so GPUs
    newer than the list JIT-compile the kernels instead of failing with 'no kernel image'."""
    # arch-specific targets (90a) have no forward-compatible PTX; embed the family's instead
    top = re.match(r"\d+", archs[-1]).group(0)
    ptx_archs = sorted({re.match(r"\d+", a).group(0) for a in ptx} | {top}, key=int)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx_archs]
    return flags


def visible_gpus() -> list[tuple[int, int]]:
    import torch

    try:
        if torch.version.cuda is None or not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver is "no GPU visible" for choosing archs
        return []


# ----------------------------------------------------------------------------- toolkit
def find_cuda_home(torch_guess: str | None) -> str:
    """The CUDA toolkit: CUDA_HOME/CUDA_PATH when set, else the first of torch's guess, the
    real location of ``nvcc`` and /usr/local/cuda that holds both nvcc and the runtime headers
    (``/usr/local/bin/nvcc`` may be a wrapper script, whose parent is no toolkit)."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "bin", "nvcc")):
            raise CudaSkip(f"CUDA_HOME={explicit} has no bin/nvcc")
        return explicit
    nvcc = shutil.which("nvcc")
    candidates = [torch_guess, "/usr/local/cuda"]
    if nvcc:
        candidates.insert(1, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (
            home
            and os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    raise CudaSkip("no CUDA toolkit found (no nvcc with its headers; set CUDA_HOME)")


def nvcc_version(home: str) -> str:
    nvcc = os.path.join(home, "bin", "nvcc")
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CudaSkip(f"{nvcc} --version did not run ({exc})") from exc
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CudaSkip(f"{nvcc} --version failed with exit code {proc.returncode}: {last[0]}")
    m = re.search(r"release (\d+)\.(\d+)", proc.stdout)
    if m is None:
        raise CudaSkip(f"{nvcc} --version printed no release number")
    return f"{m.group(1)}.{m.group(2)}"


def nvcc_archs(home: str) -> set[str] | None:
    """The archs this nvcc can build (``--list-gpu-arch``), or None when it cannot say."""
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = set(re.findall(r"compute_(\d+[a-z]?)", out))
    return found or None


def library_header_dirs(home: str, site_packages: str) -> list[str]:
    """Dirs of the pip ``nvidia`` packages beside torch that provide the CUDA library headers
    torch's CUDA headers include and this toolkit lacks (a pip CUDA torch with a minimal
    toolkit). Passed as -isystem, so the toolkit's own headers still come first."""
    missing = [
        h for h in TORCH_CUDA_LIB_HEADERS if not os.path.exists(os.path.join(home, "include", h))
    ]
    dirs: list[str] = []
    for header in missing:
        pip_dirs = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include")))
        found = [d for d in pip_dirs if os.path.exists(os.path.join(d, header))]
        if not found:
            raise CudaSkip(
                f"{header} (included by torch's CUDA headers) is neither in {home}/include "
                f"nor in a pip nvidia package under {site_packages}"
            )
        if found[0] not in dirs:
            dirs.append(found[0])
    return dirs


def use_cuda_home() -> str:
    """Finds the toolkit and points torch's cpp_extension at it (its module global is read when
    a CUDAExtension is made and while it builds)."""
    from torch.utils import cpp_extension

    home = find_cuda_home(cpp_extension.CUDA_HOME)
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return home


def configure_cuda(ext) -> dict:
    """Checks the toolkit against the installed torch and sets the CUDA extension's nvcc flags.

    Raises CudaSkip naming the cause when the CUDA kernels cannot be built here."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise CudaSkip(
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        )
    home = cpp_extension.CUDA_HOME  # set by use_cuda_home before the extension was made
    version = nvcc_version(home)
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise CudaSkip(
            f"nvcc {version} ({home}) does not match this torch's CUDA {torch.version.cuda}; "
            "install the matching toolkit and set CUDA_HOME"
        )
    arch_text, arch_source = choose_archs(visible_gpus())
    archs, ptx = parse_arch_list(arch_text)
    supported = nvcc_archs(home)
    if supported is not None:
        # --list-gpu-arch names the base archs only (90, not 90a)
        dropped = [a for a in archs if str(_arch_number(a)) not in supported]
        archs = [a for a in archs if a not in dropped]
        ptx &= set(archs)
        if dropped:
            print(f"omnifuse_fast: nvcc {version} cannot build sm_{', sm_'.join(dropped)}; skipped")
        if not archs:
            raise CudaSkip(f"nvcc {version} supports none of the archs {arch_text!r}")
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    isystem = [f for d in library_header_dirs(home, site_packages) for f in ("-isystem", d)]
    gencode = gencode_flags(archs, ptx)
    ext.extra_compile_args["nvcc"] += gencode + isystem
    return {
        "cuda_home": home,
        "nvcc": version,
        "archs": archs,
        "arch_source": arch_source,
        "gencode": gencode,
        "extra_header_dirs": isystem[1::2],
    }


# --------------------------------------------------------------------------- build_ext
def _make_build_ext(base, cuda_plan: str | None, preflight: str | None):
    """A build_ext that builds _C, then tries _C_cuda and, when that fails, prints one message
    and carries on without it. ``cuda_plan`` says why _C_cuda is not even attempted (or None);
    ``preflight`` why it was wanted but could not be set up (no toolkit)."""

    class BuildExt(base):
        def build_extensions(self):
            self.omnifuse_info = {"cxx_std": cxx_std(), "cuda_built": False}
            self.omnifuse_info["cuda_reason"] = cuda_plan
            cuda = [e for e in self.extensions if e.name == CUDA_EXT]
            if preflight is not None:
                self._announce_skip(preflight)
            elif cuda:
                try:
                    self.omnifuse_info.update(configure_cuda(cuda[0]))
                except CudaSkip as exc:
                    self._skip_cuda(str(exc))
            self._failed_cuda = False
            super().build_extensions()
            if self._failed_cuda:
                self.extensions[:] = [e for e in self.extensions if e.name != CUDA_EXT]
            elif any(e.name == CUDA_EXT for e in self.extensions):
                self.omnifuse_info.update(cuda_built=True, cuda_reason=None)

        def build_extension(self, ext):
            if ext.name != CUDA_EXT:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # CompileError, ninja's RuntimeError, a linker error, ...
                self._failed_cuda = True
                self._announce_skip(
                    f"compiling csrc/cuda failed ({type(exc).__name__}: {exc}; the compiler "
                    "output above shows the first error)"
                )

        def _skip_cuda(self, cause: str) -> None:
            self.extensions[:] = [e for e in self.extensions if e.name != CUDA_EXT]
            self._announce_skip(cause)

        def _announce_skip(self, cause: str) -> None:
            self.omnifuse_info.update(cuda_built=False, cuda_reason=cause, cuda_attempted=True)
            print(
                f"\nomnifuse_fast: the CUDA kernels are NOT built: {cause}.\n"
                "  The install continues without them: the C++ CPU kernels, Triton and the "
                "reference path work.\n  Fix the cause and reinstall to get the 'cuda' "
                "backend, or set OMNIFUSE_FAST_SKIP_CUDA=1 to not try.\n",
                flush=True,
            )

        def run(self):
            super().run()
            info = getattr(self, "omnifuse_info", None)
            if info is None:  # nothing was built (e.g. every extension up to date)
                return
            import torch

            info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
            out_dir = os.path.dirname(self.get_ext_fullpath(CPU_EXT))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, BUILD_INFO), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=1, sort_keys=True)
            if self.inplace and not info["cuda_built"]:
                # a stale in-place _C_cuda from an earlier build would claim kernels we did not build
                for stale in glob.glob(os.path.join(out_dir, "_C_cuda*.so")):
                    os.remove(stale)

    return BuildExt


def _cuda_plan(torch) -> str | None:
    """None when the CUDA kernels should be attempted, else why not (no message needed)."""
    if _flag("OMNIFUSE_FAST_SKIP_CUDA"):
        return "OMNIFUSE_FAST_SKIP_CUDA is set"
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return "no CUDA sources"
    if _flag("OMNIFUSE_FAST_FORCE_CUDA"):
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not visible_gpus():
        return "no GPU visible (OMNIFUSE_FAST_FORCE_CUDA=1 builds them anyway)"
    return None


def _extensions():
    if _flag("OMNIFUSE_FAST_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("omnifuse_fast: torch is not importable; building without the extension")
        return [], {}

    std = cxx_std()
    debug = _flag("OMNIFUSE_FAST_DEBUG")
    # -fno-trapping-math: FP exceptions are never trapped, so branchy selects in the CPU
    # kernels' row loops (csrc/cpu/common.h vexp_neg) can be if-converted and vectorized
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fopenmp", "-fno-trapping-math"]
    cxx += [f"-std={std}"]
    include = [os.path.join(HERE, "csrc")]
    cpu_sources = [os.path.join("csrc", "ops.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    exts = [
        cpp_extension.CppExtension(
            CPU_EXT,
            cpu_sources,
            include_dirs=list(include),  # a copy each: torch's Extension helpers append to it
            extra_compile_args={"cxx": cxx},
            extra_link_args=[] if debug else ["-fopenmp"],
        )
    ]
    plan, preflight = _cuda_plan(torch), None
    if plan is None:
        # No --use_fast_math: the exact log-space statistics rely on accurate expf/logf/log1pf
        # (and on denormals not being flushed); the kernels are bandwidth-bound anyway.
        # configure_cuda adds the -gencode flags and header dirs once the toolkit is checked.
        nvcc = ["-O3", f"-std={std}", "-lineinfo", "-DNDEBUG"]
        # the .cu files first: a broken nvcc then fails at once, before the slow host-only
        # module.cpp (torch's CUDA headers) is compiled in vain
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + [
            os.path.join("csrc", "cuda", "module.cpp")
        ]
        try:
            use_cuda_home()  # before CUDAExtension, which reads the toolkit's include/lib dirs
            exts.append(
                cpp_extension.CUDAExtension(
                    CUDA_EXT,
                    cuda_sources,
                    include_dirs=list(include),
                    extra_compile_args={"cxx": [f"-std={std}", "-O3"], "nvcc": nvcc},
                )
            )
        except (CudaSkip, OSError) as exc:
            preflight = str(exc)
    build_ext = _make_build_ext(cpp_extension.BuildExtension, plan, preflight)
    return exts, {"build_ext": build_ext}


if __name__ == "__main__":  # also how pip's build backend runs it; importable for tests
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
