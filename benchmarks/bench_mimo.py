"""MIMO's subroutine: ``mimo_combine`` (2 objectives, closed form) against ``mgda_min_norm``
with M + 1 objectives (Frank-Wolfe), over the same OmniFuse-like parameter list.

The paper reports about 20x less subroutine time for MIMO; each ``mgda_min_norm`` case
records ``ratio_vs_mimo_combine`` (its median over ``mimo_combine``'s, same provider and
parameter list), which ``python -m omnifuse_fast.bench report`` prints too.
"""

from __future__ import annotations

import pytest
import torch
from _harness import DEVICE, FWD, MEDIANS, Bench, Case, Inputs, params, pick, randn, run

import omnifuse_fast
from omnifuse_fast import reference
from omnifuse_fast.bench import floors

BF16, FP32 = torch.bfloat16, torch.float32


def param_shapes(m: int, d: int, h: int, k: int, c: int, in_dim: int) -> list[tuple[str, tuple]]:
    """``(owner, shape)`` of an OmniFuse model's parameters: per-modality two-layer encoders
    (``in_dim -> 2d -> d``), forward and backward CRA (K blocks ``M*d -> h -> M*d``),
    per-modality heads (``d -> c``) and the joint head on the latents (``K*h -> c``)."""
    f = m * d
    shapes: list[tuple[str, tuple]] = []
    for i in range(m):
        shapes += [(f"enc{i}", s) for s in ((2 * d, in_dim), (2 * d,), (d, 2 * d), (d,))]
    for net in ("cra_f", "cra_b"):
        for _ in range(k):
            shapes += [(net, s) for s in ((h, f), (h,), (f, h), (f,))]
    for i in range(m):
        shapes += [(f"head{i}", (c, d)), (f"head{i}", (c,))]
    shapes += [("joint", (c, k * h)), ("joint", (c,))]
    return shapes


def _grads(shapes, touched: set[str], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """One objective's gradient list: random where it touches a parameter, zeros elsewhere."""
    return [
        randn(*s, dtype=dtype, seed=seed * 1000 + j)
        if owner.rstrip("0123456789") in touched or owner in touched
        else torch.zeros(s, dtype=dtype, device=DEVICE)
        for j, (owner, s) in enumerate(shapes)
    ]


def _shapes(case: Case) -> list[tuple[str, tuple]]:
    dims = case.dims
    return param_shapes(dims["M"], dims["D"], dims["H"], dims["K"], dims["C"], dims["In"])


def _numel(case: Case) -> int:
    return sum(torch.Size(s).numel() for _, s in _shapes(case))


def _configs() -> list[dict[str, int]]:
    smoke = [{"M": 2, "D": 16, "H": 32, "K": 2, "C": 5, "In": 32}]
    default = [
        {"M": 4, "D": 128, "H": 256, "K": 5, "C": 10, "In": 256}
    ]  # 3.04M elements, 66 tensors
    large = [
        {"M": m, "D": 256, "H": 512, "K": 5, "C": 100, "In": 512} for m in (2, 4, 8)
    ]  # 6.3M .. 24.6M elements
    return pick(smoke, default, large)


def _cases(op: str) -> list[Case]:
    dtypes = pick((FP32,), (FP32,), (FP32, BF16))
    return [Case(op, dict(cfg), FWD, dt) for cfg in _configs() for dt in dtypes]


def _make_combine(case: Case) -> Inputs:
    shapes = _shapes(case)
    # L_0 (fusion) touches every parameter but the unimodal heads; L_w (worst modality,
    # here modality 0) touches its encoder, its head and the forward CRA.
    g0 = _grads(shapes, {"enc", "cra_f", "cra_b", "joint"}, case.dtype, seed=0)
    gw = _grads(shapes, {"enc0", "head0", "cra_f"}, case.dtype, seed=1)
    return Inputs((g0, gw))


def _make_mgda(case: Case) -> Inputs:
    shapes = _shapes(case)
    g0 = _grads(shapes, {"enc", "cra_f", "cra_b", "joint"}, case.dtype, seed=0)
    per_modality = [
        _grads(shapes, {f"enc{i}", f"head{i}", "cra_f"}, case.dtype, seed=1 + i)
        for i in range(case.dims["M"])
    ]
    return Inputs(([g0, *per_modality],))


COMBINE = Bench(
    public=omnifuse_fast.mimo_combine,
    reference=reference.mimo_combine,
    make=_make_combine,
    cost=lambda c: floors.mimo_combine(_numel(c), c.itemsize),
)
MGDA = Bench(
    public=omnifuse_fast.mgda_min_norm,
    reference=reference.mgda_min_norm,
    make=_make_mgda,
    cost=lambda c: floors.mgda_min_norm(_numel(c), c.itemsize, c.dims["M"] + 1),
)


def _info(case: Case) -> dict:
    return {"numel": _numel(case), "tensors": len(_shapes(case)), "pair": case.id}


@pytest.mark.parametrize("case,provider", params(_cases("mimo_combine")))
def test_mimo_combine(benchmark, case, provider):
    run(benchmark, case, provider, COMBINE, extra={**_info(case), "objectives": 2})


# Frank-Wolfe branches on data each iteration (argmin index, step size): dynamo breaks the
# graph there, recompiles per iteration count until its recompile limit, then runs eager.
# That measures dynamo's fallback, not a compiled baseline.
NO_COMPILE = {
    "compile": "Frank-Wolfe's data-dependent loop does not compile (graph breaks, "
    "recompile limit, eager fallback)"
}


@pytest.mark.parametrize("case,provider", params(_cases("mgda_min_norm"), skip=NO_COMPILE))
def test_mgda_min_norm(benchmark, case, provider):
    median = run(
        benchmark, case, provider, MGDA, extra={**_info(case), "objectives": case.dims["M"] + 1}
    )
    combine = MEDIANS.get(("mimo_combine", case.id), {}).get(provider)
    benchmark.extra_info["ratio_vs_mimo_combine"] = median / combine if combine else None
