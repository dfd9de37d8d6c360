"""One graph: the OmniFuse training forward and ModalityMixer trace with no graph break.

``torch._dynamo.explain`` counts the graphs of the training forward (every eq. 18 term, the
supervision drop, the TLA mask; both TLA modes, multiclass and multilabel), of the eval forward
and of the mixer with ``src`` given, on the reference and cpu backends and on the Triton
kernels in the interpreter. ``torch.compile(fullgraph=True)`` then runs the step and matches
eager. Tiny sizes: tracing, not speed, is under test.
"""

from __future__ import annotations

import pytest
import torch
from _harness import cpu_backend, tiny_omnifuse

from omnifuse_fast.nn import ModalityMixer, OmniFuse

B, VIEW_DIMS, C = 6, (5, 6, 7), 3


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request, monkeypatch):
    torch._dynamo.reset()
    yield cpu_backend(request.param, monkeypatch)
    torch._dynamo.reset()


# Every backend traces the default step; the variants (drop drawn inside the graph, TLA on
# subsets, multilabel) differ only in module code, so the reference covers them (tracing is slow).
TRAIN_CASES = [
    pytest.param(b, "observed", False, "present-given", id=f"{b}-default")
    for b in ("reference", "cpu", "triton")
] + [
    pytest.param("reference", "observed", False, "drawn-inside", id="reference-drawn-inside"),
    pytest.param("cpu", "subsets", True, "drawn-inside", id="cpu-subsets-multilabel-drawn"),
    pytest.param("reference", "subsets", False, "present-given", id="reference-subsets"),
    pytest.param("reference", "observed", True, "present-given", id="reference-multilabel"),
]


def _model(backend: str, tla_mode: str = "observed", multilabel: bool = False) -> OmniFuse:
    return tiny_omnifuse(VIEW_DIMS, C, 4, backend, tla_mode=tla_mode, multilabel=multilabel)


def _batch(multilabel: bool = False):
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(B, d, generator=g) for d in VIEW_DIMS]
    observed = torch.ones(B, len(VIEW_DIMS), dtype=torch.bool)
    observed[0, 1] = observed[1, 0] = observed[2, 2] = False
    if multilabel:
        labels = (torch.rand(B, C, generator=g) < 0.5).float()
    else:
        labels = torch.arange(B) % C
    return views, observed, labels


def _one_graph(fn, *args) -> None:
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    reasons = [f"{b.reason.splitlines()[0]} at {b.user_stack[-1:]}" for b in report.break_reasons]
    assert report.graph_count == 1 and report.graph_break_count == 0, reasons


@pytest.mark.parametrize("backend,tla_mode,multilabel,drop", TRAIN_CASES)
def test_training_forward_is_one_graph(backend, tla_mode, multilabel, drop, monkeypatch):
    cpu_backend(backend, monkeypatch)
    model = _model(backend, tla_mode, multilabel).train()
    views, observed, labels = _batch(multilabel)
    present = model.draw_present(observed) if drop == "present-given" else None

    def step(views, observed, labels, present):
        out = model(views, observed, labels, present=present)
        return out.losses["total"], out.joint_logits

    _one_graph(step, views, observed, labels, present)
    assert {"forward", "backward", "enc", "ra", "dwfuse", "tla", "total"} <= set(
        model(views, observed, labels, present=observed).losses
    )


def test_eval_forward_is_one_graph(backend):
    model = _model(backend).eval()
    views, observed, _ = _batch()
    _one_graph(lambda v, o: model(v, o).joint_logits, views, observed)


def test_mixer_with_sources_is_one_graph(backend):
    mixer = ModalityMixer(3, C, backend=backend)
    src = mixer.sources(B)
    v = torch.randn(B, 3, 4)
    _one_graph(mixer, v, torch.arange(B) % C, src)


def test_fullgraph_compiled_step_matches_eager(backend):
    """The compiled training step (present drawn outside) gives eager's loss and gradients."""
    model = _model(backend).train()
    views, observed, labels = _batch()
    present = model.draw_present(observed, torch.Generator().manual_seed(5))

    def step(views, observed, labels, present):
        return model(views, observed, labels, present=present).losses["total"]

    params = list(model.parameters())
    want = step(views, observed, labels, present)
    want_g = torch.autograd.grad(want, params, allow_unused=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    # the Triton ops' documented setting for compiling in TRITON_INTERPRET mode
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        got = compiled(views, observed, labels, present)
    got_g = torch.autograd.grad(got, params, allow_unused=True)
    torch.testing.assert_close(got, want)
    for a, e in zip(got_g, want_g):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e)


def test_draw_present_is_the_drop_forward_draws():
    """Drawing the mask outside the graph changes nothing: same RNG state, same mask."""
    model = _model("reference").train()
    views, observed, labels = _batch()
    torch.manual_seed(11)
    inside = model(views, observed, labels).present
    torch.manual_seed(11)
    outside = model.draw_present(observed)
    assert torch.equal(inside, outside) and not torch.equal(outside, observed)
    model.eval()
    assert torch.equal(model.draw_present(observed), observed)
