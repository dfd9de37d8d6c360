"""Device value checks on a GPU (omnifuse_fast/_device_checks.py): the cuda and triton backends.

With the Python value checks off, a bad label, comb or src must trigger the kernels' device
assert, naming the argument, at the next synchronizing point, and never an illegal memory
access; a good call must make no host synchronization. A device-side assert leaves the CUDA
context unusable, so every bad-value case runs in a fresh subprocess.

Run with ``pytest -m gpu`` on a machine with a GPU (skipped elsewhere);
``tests/test_device_checks.py`` runs the Triton side in the interpreter anywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import omnifuse_fast as of
from omnifuse_fast import _dispatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, M, C, D = 4096, 3, 10, 64

# One bad-value call per case, then a synchronizing read. Run as a script: "<backend> <case>".
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import omnifuse_fast as of

    backend, case, compiled = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    B, M, C, D = {B}, {M}, {C}, {D}
    of.set_value_checks(False)
    g = torch.Generator("cuda").manual_seed(0)
    z3 = torch.randn(B, M, C, device="cuda", generator=g, requires_grad=True)
    z2 = torch.randn(B, C, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    comb = torch.randint(1, 1 << M, (B,), device="cuda", generator=g)
    v = torch.randn(B, M, D, device="cuda", generator=g, requires_grad=True)
    src = torch.stack([torch.randperm(B, device="cuda", generator=g) for _ in range(M)])
    ml = torch.randint(0, 2, (B, C), device="cuda", generator=g).float()
    w = torch.full((B, M), 1.0 / M, device="cuda")
    no_modality = torch.ones(B, M, dtype=torch.bool, device="cuda")
    no_modality[B // 2] = False

    def bad(t, value, index=B // 2):
        t = t.clone()
        t.view(-1)[index] = value
        return t

    cases = {{
        "dw-labels-C": lambda: of.dwfuse_loss(z3, bad(y, C), backend=backend),
        "dw-labels-neg": lambda: of.dwfuse_weights(z3, bad(y, -1), backend=backend),
        "dw-multilabel": lambda: of.dwfuse_loss(z3, bad(ml, 0.5), backend=backend, multilabel=True),
        "tla-labels": lambda: of.tla_stats(z2, bad(y, 10**6), comb, M, backend=backend),
        "tla-comb-0": lambda: of.tla_stats(z2, y, bad(comb, 0), M, backend=backend),
        "tla-comb-2M": lambda: of.tla_stats(z2, y, bad(comb, 1 << M), M, backend=backend),
        "tla-loss-comb": lambda: of.tla_loss(z2, y, bad(comb, -5), 1, backend=backend),
        "tla-loss-labels": lambda: of.tla_loss(z2, bad(y, C), comb, 1, backend=backend),
        "mix-src-B": lambda: of.modality_mix(v, y, bad(src, B), C, backend=backend),
        "mix-src-huge": lambda: of.modality_mix(v, y, bad(src, 10**9), C, backend=backend),
        "mix-labels": lambda: of.modality_mix(v, bad(y, -3), src, C, backend=backend),
        "dw-nan": lambda: of.dwfuse_loss(bad(z3.detach(), float("nan")), y, backend=backend),
        "tla-inf": lambda: of.tla_stats(bad(z2.detach(), float("inf")), y, comb, M,
                                        backend=backend),
        "sce-nan": lambda: of.soft_cross_entropy(z2, bad(z2.detach().softmax(1), float("nan")),
                                                 backend=backend),
        "present": lambda: of.combination_ids(no_modality, backend=backend),
        "mix-weights": lambda: of.modality_mix(v, y, src, C, bad(w, -1.0), backend=backend),
    }}
    fn = cases[case]
    if compiled:  # compiling may synchronize: only the eager call is held to no sync
        out = torch.compile(fn, fullgraph=True)()
    else:
        torch.cuda.set_sync_debug_mode("error")  # the call itself must not synchronize
        out = fn()
        torch.cuda.set_sync_debug_mode(0)
    print("CALL RETURNED", flush=True)
    torch.cuda.synchronize()  # the device assert surfaces here
    print("NO ERROR", flush=True)
    """
).format(B=B, M=M, C=C, D=D)

CASES = {
    "dw-labels-C": "labels must be class indices in [0, C)",
    "dw-labels-neg": "labels must be class indices in [0, C)",
    "dw-multilabel": "labels (multilabel) must hold only 0 and 1",
    "tla-labels": "labels must be class indices in [0, C)",
    "tla-comb-0": "comb must be combination ids in [1, 2**M)",
    "tla-comb-2M": "comb must be combination ids in [1, 2**M)",
    "tla-loss-comb": "comb must be combination ids in [1, 2**M)",
    "tla-loss-labels": "labels must be class indices in [0, C)",
    "mix-src-B": "src must be source indices in [0, B)",
    "mix-src-huge": "src must be source indices in [0, B)",
    "mix-labels": "labels must be class indices in [0, C)",
    "dw-nan": "logits must be finite (no NaN or inf)",
    "tla-inf": "logits must be finite (no NaN or inf)",
    "sce-nan": "soft_labels must be finite (no NaN or inf)",
    "present": "present has a sample with no present modality",
    "mix-weights": "weights must be on the simplex",
}


def _skip_unavailable(backend: str) -> None:
    reason = _dispatch.unavailable_reason("dwfuse_loss", backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _run(backend: str, case: str, compiled: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, case, "1" if compiled else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_value_is_a_device_assert_naming_the_argument(backend, case):
    _skip_unavailable(backend)
    proc = _run(backend, case, compiled=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-4000:]
    assert "CALL RETURNED" in out, f"the call itself raised or synchronized:\n{out[-4000:]}"
    assert CASES[case] in out, out[-4000:]
    assert "device-side assert" in out, out[-4000:]
    assert "illegal memory access" not in out, out[-4000:]


@pytest.mark.parametrize("case", ["dw-labels-C", "tla-comb-0", "mix-src-B"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_value_under_torch_compile(backend, case):
    _skip_unavailable(backend)
    proc = _run(backend, case, compiled=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-4000:]
    assert CASES[case] in out, out[-4000:]
    assert "illegal memory access" not in out, out[-4000:]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_call_makes_no_host_sync(backend):
    """Forward and backward of each index-reading op, checks off, under sync debug "error".

    (The default settings, checks on, are covered by test_device_checks_gpu_default.py: the
    GPU backends leave the checks to the kernels, so they make no host sync either.)
    """
    _skip_unavailable(backend)
    g = torch.Generator("cuda").manual_seed(1)
    z3 = torch.randn(B, M, C, device="cuda", generator=g, requires_grad=True)
    z2 = torch.randn(B, C, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    comb = torch.randint(1, 1 << M, (B,), device="cuda", generator=g)
    v = torch.randn(B, M, D, device="cuda", generator=g, requires_grad=True)
    src = torch.stack([torch.randperm(B, device="cuda", generator=g) for _ in range(M)])

    def step():
        loss = of.dwfuse_loss(z3, y, 0.5, False, backend=backend)
        loss = loss + of.dwfuse_weights(z3, y, backend=backend).sum()
        loss = loss + of.tla_loss(z2, y, comb, 1, backend=backend)
        sums, _ = of.tla_stats(z2, y, comb, M, backend=backend)
        v_mix, soft = of.modality_mix(v, y, src, C, backend=backend)
        loss = loss + sums.sum() + v_mix.square().mean() + soft.sum()
        loss.backward()
        return loss

    of.set_value_checks(False)
    try:
        step()  # warm up: kernel compilation and the allocator may synchronize
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        of.set_value_checks(True)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
