"""Calls every public op forward and backward once per backend, for compute-sanitizer.

``scripts/gpu_check.sh`` runs it under ``compute-sanitizer --tool memcheck`` on the ``cuda`` and
``triton`` backends; sizes are small (memcheck is slow) but not tile multiples, so the masked
edges of every kernel are exercised. The CPU test suite runs it with ``--device cpu --backends
cpu,reference`` so a renamed op or argument fails here, not on the GPU machine.

Prints one JSON line: {"device", "calls": {backend: [op, ...]}, "uncovered": [op], "ok": bool};
exits 1 when a backend is unavailable or a public op was not called.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import omnifuse_fast as of
from omnifuse_fast import _dispatch
from omnifuse_fast._dispatch import OPS as PUBLIC_OPS
from omnifuse_fast.reference.mix import random_sources


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)


def _backward(*outs) -> None:
    loss = sum(o.float().sum() for o in outs if o.requires_grad)
    loss.backward()


def run_all(backend: str, device: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Every op forward (and backward where it has one) on ``backend``; the ops called."""
    called = []

    def r(*shape, seed, scale=1.0):
        return _randn(*shape, seed=seed, scale=scale, dtype=dtype, device=device)

    # CRA cascade: B=37 rows, F=48, H=40, K=2 RAs (no tile multiple)
    bsz, feat, hid, k = 37, 48, 40, 2
    cra = [
        r(bsz, feat, seed=1),
        r(k, hid, feat, seed=2, scale=feat**-0.5),
        r(k, hid, seed=3, scale=0.1),
        r(k, feat, hid, seed=4, scale=hid**-0.5),
        r(k, feat, seed=5, scale=0.1),
    ]
    cra = [t.requires_grad_() for t in cra]
    _backward(*of.cra_forward(*cra, activation="gelu", backend=backend))
    called.append("cra_forward")

    # DWFuse: multiclass and multilabel
    z = r(29, 3, 11, seed=6, scale=3.0).requires_grad_()
    y = torch.randint(0, 11, (29,), generator=_gen(7)).to(device)
    _backward(of.dwfuse_loss(z, y, 0.5, False, backend=backend))
    _backward(of.dwfuse_weights(z, y, 0.5, backend=backend))
    y_ml = torch.randint(0, 2, (29, 11), generator=_gen(8)).to(device=device, dtype=dtype)
    _backward(of.dwfuse_loss(z, y_ml, 0.5, True, backend=backend, multilabel=True))
    called += ["dwfuse_loss", "dwfuse_weights"]

    # TLA: combination ids, statistics, masked loss
    present = torch.rand(53, 3, generator=_gen(9)).to(device) > 0.3
    present[:, 0] = True
    comb = of.combination_ids(present, backend=backend)
    logits = r(53, 10, seed=10).requires_grad_()
    labels = torch.randint(0, 10, (53,), generator=_gen(11)).to(device)
    of.tla_stats(logits, labels, comb, 3, "ce", backend=backend)
    of.tla_stats(logits, labels, comb, 3, "l1", backend=backend)
    _backward(of.tla_loss(logits, labels, comb, 1, backend=backend))
    called += ["combination_ids", "tla_stats", "tla_loss"]

    # MM learning: modality mix and soft-label CE
    v = r(31, 3, 17, seed=12).requires_grad_()
    y = torch.randint(0, 6, (31,), generator=_gen(13)).to(device)
    src = random_sources(31, 3, _gen(14)).to(device)
    w = torch.softmax(r(31, 3, seed=15), 1).detach().requires_grad_()
    _backward(*of.modality_mix(v, y, src, 6, w, backend=backend))
    q = torch.softmax(r(31, 6, seed=16), 1).detach().requires_grad_()
    logits = r(31, 6, seed=17).requires_grad_()
    _backward(of.soft_cross_entropy(logits, q, backend=backend))
    called += ["modality_mix", "soft_cross_entropy"]

    # MIMO: two-objective combine, T-objective MGDA
    shapes = [(33, 7), (5,), (3, 4, 9)]
    g0 = [r(*s, seed=20 + i).requires_grad_() for i, s in enumerate(shapes)]
    gw = [r(*s, seed=30 + i) for i, s in enumerate(shapes)]
    d, lam = of.mimo_combine(g0, gw, backend=backend)
    _backward(*d, lam)
    grads = [[r(*s, seed=40 + 10 * t + i) for i, s in enumerate(shapes)] for t in range(3)]
    of.mgda_min_norm(grads, backend=backend)
    called += ["mimo_combine", "mgda_min_norm"]

    if device == "cuda":
        torch.cuda.synchronize()  # a kernel fault surfaces here, inside this backend's run
    return called


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    device = torch.device(args.device)
    missing = {b: _dispatch.unavailable_reason("dwfuse_loss", b, device) for b in backends}
    missing = {b: why for b, why in missing.items() if why}
    if missing:  # a backend that cannot run must fail the check, not be skipped
        print(json.dumps({"ok": False, "unavailable": missing}))
        return 1
    calls = {b: run_all(b, args.device) for b in backends}
    # every public op, so a new op cannot slip past the sanitizer
    uncovered = sorted(set(PUBLIC_OPS) - {op for ops in calls.values() for op in ops})
    ok = not uncovered
    print(json.dumps({"device": args.device, "calls": calls, "uncovered": uncovered, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
