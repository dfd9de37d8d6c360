"""torch.compile over the public functions on the C++ CPU backend: one graph, eager results.

Dynamo traces validation, dispatch and the custom ops (their fake impls) into one graph
(fullgraph=True); AOTAutograd traces the registered backward ops too, so gradients are checked
as well. Most cases use the "aot_eager" backend (the whole trace, no C++ codegen: compiling
with inductor takes long on small CI machines); one case goes through inductor end to end.
"""

from __future__ import annotations

import pytest
import torch
from _harness import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

import omnifuse_fast as of

pytestmark = pytest.mark.backend("cpu")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=_g(seed)).requires_grad_(grad)


B, M, C, D = 6, 3, 5, 4


def _mimo_combine(a, b, c, d, backend):
    direction, lam = of.mimo_combine([a, b], [c, d], backend=backend)
    return (*direction, lam)


def _cases():
    """name -> (fn(*tensors, backend), tensors); fn returns a tuple of tensors."""
    y = torch.randint(0, C, (B,), generator=_g(1))
    comb = torch.tensor([1, 3, 7, 3, 2, 3])
    src = torch.randint(0, B, (M, B), generator=_g(2))
    present = torch.rand(B, M, generator=_g(3)) > 0.4
    present[:, 0] = True
    k, h, f = 2, 3, 7
    return {
        "combination_ids": (
            lambda p, backend: (of.combination_ids(p, backend=backend),),
            [present],
        ),
        "cra_forward": (
            lambda x, w1, b1, w2, b2, backend: of.cra_forward(x, w1, b1, w2, b2, "relu", backend),
            [
                _randn(B, f, grad=True),
                _randn(k, h, f, seed=1, grad=True),
                _randn(k, h, seed=2, grad=True),
                _randn(k, f, h, seed=3, grad=True),
                _randn(k, f, seed=4, grad=True),
            ],
        ),
        "dwfuse_weights": (
            lambda z, backend: (of.dwfuse_weights(z, y, 0.5, backend=backend),),
            [_randn(B, M, C, grad=True)],
        ),
        "dwfuse_loss": (
            lambda z, backend: (of.dwfuse_loss(z, y, 0.5, False, backend=backend),),
            [_randn(B, M, C, grad=True)],
        ),
        "tla_stats": (
            lambda z, backend: of.tla_stats(z, y, comb, M, "l1", backend=backend),
            [_randn(B, C)],
        ),
        "tla_loss": (
            lambda z, backend: (of.tla_loss(z, y, comb, 3, backend=backend),),
            [_randn(B, C, grad=True)],
        ),
        "modality_mix": (
            lambda v, backend: of.modality_mix(v, y, src, C, backend=backend),
            [_randn(B, M, D, grad=True)],
        ),
        "soft_cross_entropy": (
            lambda z, q, backend: (of.soft_cross_entropy(z, q, backend=backend),),
            [_randn(B, C, grad=True), torch.softmax(_randn(B, C, seed=5), -1).requires_grad_()],
        ),
        "mimo_combine": (
            _mimo_combine,
            [_randn(4, 3), _randn(5, seed=1), _randn(4, 3, seed=2), _randn(5, seed=3)],
        ),
    }


def _run(fn, tensors, backend):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves, backend=backend)
    diff = [t for t in leaves if t.requires_grad]
    grads = ()
    if diff:
        total = sum((o.float() * (1.0 + o.detach().float())).sum() for o in out if o.requires_grad)
        grads = torch.autograd.grad(total, diff)
    return out, grads


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("name", list(_cases()))
def test_compile_one_graph_matches_eager(name, backend):
    fn, tensors = _cases()[name]
    eager_out, eager_grads = _run(fn, tensors, backend)  # also loads the backend eagerly
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    out, grads = _run(compiled, tensors, backend)
    assert counter.frame_count == 1
    assert len(out) == len(eager_out) and len(grads) == len(eager_grads)
    for a, e in zip((*out, *grads), (*eager_out, *eager_grads), strict=True):
        if a.is_floating_point():
            assert_close(a, e)
        else:
            assert torch.equal(a, e)
    if backend == "cpu" and name != "combination_ids":
        # the compiled graph calls our custom ops (not a silent fallback to the reference)
        assert any("omnifuse_fast" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def test_mgda_min_norm_compiles_with_graph_breaks():
    # Frank-Wolfe picks a vertex per step with a data-dependent branch (the reference's
    # algorithm, shared by every backend): no single graph, but correct results
    grads = [[_randn(4, 3, seed=3 * t), _randn(5, seed=3 * t + 1)] for t in range(3)]
    eager = of.mgda_min_norm(grads, backend="cpu")
    compiled = torch.compile(lambda g: of.mgda_min_norm(g, backend="cpu"), backend="aot_eager")(
        grads
    )
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])


def test_inductor_end_to_end():
    """One real inductor compile: dwfuse_loss forward and backward, with dynamo's one graph."""
    z = _randn(B, M, C, grad=True)
    y = torch.randint(0, C, (B,), generator=_g(1))
    fn = lambda z: of.dwfuse_loss(z, y, 0.5, False, backend="cpu")  # noqa: E731
    eager = fn(z)
    (eager_grad,) = torch.autograd.grad(eager, z)
    counter = CompileCounterWithBackend("inductor")
    out = torch.compile(fn, backend=counter, fullgraph=True)(z)
    (grad,) = torch.autograd.grad(out, z)
    assert counter.frame_count == 1
    assert_close(out, eager)
    assert_close(grad, eager_grad)


def test_fullgraph_compile_as_the_very_first_call_of_a_fresh_process():
    """No eager warm-up: the backends are loaded at import, so the first trace has no break."""
    import subprocess
    import sys

    code = (
        "import torch, omnifuse_fast as o\n"
        "f = torch.compile(o.dwfuse_loss, fullgraph=True, backend='eager')\n"
        "z, y = torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long)\n"
        "torch.testing.assert_close(f(z, y), o.dwfuse_loss(z, y, backend='reference'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
