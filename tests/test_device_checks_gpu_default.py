"""Device value checks on a GPU with the default settings (value checks on): cuda and triton.

The GPU backends are kernel-checked (SPEC section 7): with value checks on, no op reads its
data on the host, so one call of each op makes no host synchronization, and a bad value is a
device-side assert naming the argument that surfaces at the next synchronizing point (never an
illegal memory access). ``tests/test_device_checks_gpu.py`` holds the same with checks off.

A device-side assert leaves the CUDA context unusable, so every bad-value case runs in a fresh
subprocess. Run with ``pytest -m gpu`` on a machine with a GPU (skipped elsewhere).
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

B, M, C, D, H, K = 4096, 3, 10, 64, 64, 2

# One bad-value call with the default settings, then a synchronizing read: "<backend> <case>".
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import omnifuse_fast as of

    backend, case = sys.argv[1], sys.argv[2]
    B, M, C, D, H, K = {B}, {M}, {C}, {D}, {H}, {K}
    assert of.value_checks_enabled()
    g = torch.Generator("cuda").manual_seed(0)
    z3 = torch.randn(B, M, C, device="cuda", generator=g)
    z2 = torch.randn(B, C, device="cuda", generator=g)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    comb = torch.randint(1, 1 << M, (B,), device="cuda", generator=g)
    v = torch.randn(B, M, D, device="cuda", generator=g)
    src = torch.stack([torch.randperm(B, device="cuda", generator=g) for _ in range(M)])
    ml = torch.randint(0, 2, (B, C), device="cuda", generator=g).float()
    w = torch.full((B, M), 1.0 / M, device="cuda")
    x = torch.randn(B, M * D, device="cuda", generator=g)
    cra = [torch.randn(K, H, M * D, device="cuda", generator=g) * 0.05,
           torch.zeros(K, H, device="cuda"),
           torch.randn(K, M * D, H, device="cuda", generator=g) * 0.05,
           torch.zeros(K, M * D, device="cuda")]
    grads = [torch.randn(1000, device="cuda", generator=g), torch.randn(7, 3, device="cuda")]
    no_modality = torch.ones(B, M, dtype=torch.bool, device="cuda")
    no_modality[B // 2] = False

    def bad(t, value, index=B // 2):
        t = t.clone()
        t.view(-1)[index % t.numel()] = value  # a fill on the device: no sync
        return t

    def good(t, value, index=None):
        return t

    nan = float("nan")
    cases = lambda bad: {{  # noqa: E731
        "dw-labels": lambda: of.dwfuse_loss(z3, bad(y, C), backend=backend),
        "dw-weights-labels": lambda: of.dwfuse_weights(z3, bad(y, -1), backend=backend),
        "dw-multilabel": lambda: of.dwfuse_loss(z3, bad(ml, 0.5), backend=backend,
                                                multilabel=True),
        "dw-nan": lambda: of.dwfuse_loss(bad(z3, nan), y, backend=backend),
        "tla-comb": lambda: of.tla_stats(z2, y, bad(comb, 1 << M), M, backend=backend),
        "tla-loss-labels": lambda: of.tla_loss(z2, bad(y, 10**6), comb, 1, backend=backend),
        "mix-src": lambda: of.modality_mix(v, y, bad(src, B), C, backend=backend),
        "mix-weights": lambda: of.modality_mix(v, y, src, C, bad(w, -1.0), backend=backend),
        "sce-nan": lambda: of.soft_cross_entropy(bad(z2, nan), z2.softmax(1), backend=backend),
        "present": lambda: of.combination_ids(no_modality, backend=backend),
        "cra-nan": lambda: of.cra_forward(bad(x, nan), *cra, backend=backend),
        "mimo-nan": lambda: of.mimo_combine(grads, [bad(grads[0], nan), grads[1]],
                                            backend=backend),
    }}
    cases(good)[case]()  # compile the kernels on good data first: the bad call must not sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    out = cases(bad)[case]()
    torch.cuda.set_sync_debug_mode(0)
    print("CALL RETURNED", flush=True)
    torch.cuda.synchronize()  # the device assert surfaces here
    print("NO ERROR", flush=True)
    """
).format(B=B, M=M, C=C, D=D, H=H, K=K)

CASES = {
    "dw-labels": "labels must be class indices in [0, C)",
    "dw-weights-labels": "labels must be class indices in [0, C)",
    "dw-multilabel": "labels (multilabel) must hold only 0 and 1",
    "dw-nan": "logits must be finite (no NaN or inf)",
    "tla-comb": "comb must be combination ids in [1, 2**M)",
    "tla-loss-labels": "labels must be class indices in [0, C)",
    "mix-src": "src must be source indices in [0, B)",
    "mix-weights": "weights must be on the simplex",
    "sce-nan": "logits must be finite (no NaN or inf)",
    "present": "present has a sample with no present modality",
    "cra-nan": "x must be finite (no NaN or inf)",
    "mimo-nan": "gradients must be finite (no NaN or inf)",
}


def _skip_unavailable(backend: str) -> None:
    reason = _dispatch.unavailable_reason("dwfuse_loss", backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_value_with_default_settings_is_a_device_assert(backend, case):
    """The bad call returns without a host sync (the Python pass is not run for a GPU backend);
    the device assert, naming the argument, surfaces at the next synchronize."""
    _skip_unavailable(backend)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, case], capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-4000:]
    assert "CALL RETURNED" in out, f"the call itself raised or synchronized:\n{out[-4000:]}"
    assert CASES[case] in out, out[-4000:]
    assert "device-side assert" in out, out[-4000:]
    assert "illegal memory access" not in out, out[-4000:]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_call_of_each_op_makes_no_host_sync(backend):
    """Value checks on (the default): forward and backward of every op but the MGDA baseline
    (its Frank-Wolfe loop reads the Gram on the host by design), under sync debug "error"."""
    _skip_unavailable(backend)
    assert of.value_checks_enabled()
    g = torch.Generator("cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).requires_grad_()

    z3, z2, v = randn(B, M, C), randn(B, C), randn(B, M, D)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    ml = torch.randint(0, 2, (B, C), device="cuda", generator=g).float()
    comb = torch.randint(1, 1 << M, (B,), device="cuda", generator=g)
    src = torch.stack([torch.randperm(B, device="cuda", generator=g) for _ in range(M)])
    w = torch.full((B, M), 1.0 / M, device="cuda", requires_grad=True)
    present = torch.rand(B, M, device="cuda", generator=g) < 0.5
    present[:, 0] = True
    x = randn(B, M * D)
    cra = [t.mul(0.05).detach().requires_grad_() for t in (randn(K, H, M * D), randn(K, M * D, H))]
    b1, b2 = torch.zeros(K, H, device="cuda"), torch.zeros(K, M * D, device="cuda")
    g0, gw = [randn(1000), randn(7, 3)], [randn(1000), randn(7, 3)]

    def step():
        loss = of.dwfuse_loss(z3, y, 0.5, False, backend=backend)
        loss = loss + of.dwfuse_loss(z3, ml, backend=backend, multilabel=True)
        loss = loss + of.dwfuse_weights(z3, y, backend=backend).sum()
        loss = loss + of.tla_loss(z2, y, comb, 1, backend=backend)
        sums, _ = of.tla_stats(z2, y, comb, M, backend=backend)
        ids = of.combination_ids(present, backend=backend)
        v_mix, soft = of.modality_mix(v, y, src, C, w, backend=backend)
        loss = loss + of.soft_cross_entropy(z2, soft, backend=backend)
        out, lat = of.cra_forward(x, cra[0], b1, cra[1], b2, backend=backend)
        d, lam = of.mimo_combine(g0, gw, backend=backend)
        loss = loss + sums.sum() + ids.sum() + v_mix.square().mean() + out.mean() + lat.mean()
        loss = loss + sum(t.sum() for t in d) + lam
        loss.backward()
        return loss

    step()  # warm up: kernel compilation and the allocator may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
