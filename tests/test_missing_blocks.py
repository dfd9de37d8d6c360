"""Missing blocks may hold anything: NaN, inf or 1e30 there change no value and no gradient.

For ``OmniFuseImputer`` and ``OmniFuse``, on every backend (the Triton kernels in the
interpreter), in training and in evaluation, with value checks on and off: the outputs and the
gradients (parameters and inputs, the encoders' included) equal those of zero-filled blocks,
bit for bit. Observed blocks that are not finite are refused, naming the user's argument.
"""

from __future__ import annotations

import pytest
import torch
from _harness import cpu_backend, tiny_omnifuse

import omnifuse_fast as of
from omnifuse_fast.nn import OmniFuse, OmniFuseImputer

# (what the missing blocks hold, value checks on): "mixed" cycles NaN, inf, -inf and 1e30
FILLS = [("nan", True), ("inf", True), ("1e30", True), ("mixed", False)]
B, M, D = 7, 3, 4
VIEW_DIMS = (5, 3, 6)


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request, monkeypatch):
    return cpu_backend(request.param, monkeypatch)


def _fill_id(case) -> str:
    return f"{case[0]}-checks-{'on' if case[1] else 'off'}"


@pytest.fixture(params=FILLS, ids=_fill_id)
def fill(request):
    """What the missing blocks hold; value checks switched as the case says."""
    name, checks = request.param
    of.set_value_checks(checks)
    yield name
    of.set_value_checks(True)


# The model on the Triton interpreter is slow: there the mixed fill (every kind at once) runs.
MODEL_CASES = [
    pytest.param(b, f, id=f"{b}-{_fill_id(f)}") for b in ("reference", "cpu") for f in FILLS
] + [pytest.param("triton", FILLS[-1], id=f"triton-{_fill_id(FILLS[-1])}")]


def _filled(x: torch.Tensor, keep: torch.Tensor, fill: str | float) -> torch.Tensor:
    """``x`` where ``keep`` (broadcast), the fill elsewhere."""
    if fill == "mixed":
        cycle = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30])
        junk = cycle[torch.arange(x.numel()) % 4].view_as(x)
    else:
        junk = torch.full_like(x, float(fill))
    return torch.where(keep, x, junk)


def _observed() -> torch.Tensor:
    obs = torch.ones(B, M, dtype=torch.bool)
    obs[0, 1] = obs[1, 0] = obs[2, 2] = obs[3, 0] = obs[3, 1] = False
    return obs


def _same(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)


def _grads(module: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()] + [x.grad for x in inputs]


def _imputer_run(backend, training, missing_embedding, fill):
    torch.manual_seed(0)
    imp = OmniFuseImputer(
        M, D, hidden=5, num_blocks=2, missing_embedding=missing_embedding, backend=backend
    )
    if imp.missing is not None:
        with torch.no_grad():
            imp.missing.normal_()
    imp.train(training)
    obs = _observed()
    v = _filled(torch.randn(B, M, D), obs.unsqueeze(-1), fill).requires_grad_()
    u = torch.randn(M, D, requires_grad=True) if missing_embedding == "zero_input" else None
    present = imp.draw_present(obs, torch.Generator().manual_seed(1))
    out = imp(v, obs, u, present=present)
    g = torch.Generator().manual_seed(2)
    total = (out.v_full * torch.randn(out.v_full.shape, generator=g)).sum()
    total = total + (out.latents * torch.randn(out.latents.shape, generator=g)).sum()
    total = total + out.loss_forward + out.loss_backward
    total.backward()
    extra = (u,) if u is not None else ()
    return out, _grads(imp, v, *extra)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("missing_embedding", ["learned", "zero_input"])
def test_imputer_ignores_missing_blocks(backend, training, missing_embedding, fill):
    want, want_g = _imputer_run(backend, training, missing_embedding, 0.0)
    got, got_g = _imputer_run(backend, training, missing_embedding, fill)
    for name in want._fields:
        _same(getattr(got, name), getattr(want, name), name)
    assert all(torch.isfinite(t).all() for t in got if isinstance(t, torch.Tensor))
    for i, (a, e) in enumerate(zip(got_g, want_g)):
        _same(a, e, f"gradient {i}")
    assert torch.isfinite(got_g[-1 if missing_embedding == "learned" else -2]).all()


def _model_run(backend, training, tla_mode, missing_embedding, fill):
    # miner.lazy = 3: modalities 0 and 1, the TLA term is live
    model = tiny_omnifuse(
        VIEW_DIMS, 3, D, backend, tla_mode=tla_mode, missing_embedding=missing_embedding
    )
    model.train(training)
    obs = _observed()
    views = [
        _filled(torch.randn(B, d), obs[:, i : i + 1], fill).requires_grad_()
        for i, d in enumerate(VIEW_DIMS)
    ]
    labels = torch.arange(B) % 3
    present = model.draw_present(obs, torch.Generator().manual_seed(1))
    out = model(views, obs, labels, present=present)
    out.losses["total"].backward()
    return out, _grads(model, *views)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "tla_mode,missing_embedding", [("observed", "zero_input"), ("subsets", "learned")]
)
@pytest.mark.parametrize("backend,fill_case", MODEL_CASES)
def test_model_ignores_missing_view_rows(
    backend, fill_case, training, tla_mode, missing_embedding, monkeypatch
):
    cpu_backend(backend, monkeypatch)
    fill, checks = fill_case
    of.set_value_checks(checks)  # conftest turns them back on
    want, want_g = _model_run(backend, training, tla_mode, missing_embedding, 0.0)
    got, got_g = _model_run(backend, training, tla_mode, missing_embedding, fill)
    for name in ("joint_logits", "modality_logits", "comb", "present", "embeddings", "v_full"):
        _same(getattr(got, name), getattr(want, name), name)
    assert set(got.losses) == set(want.losses)
    for name, value in want.losses.items():
        _same(got.losses[name], value, f"losses[{name!r}]")
        assert torch.isfinite(got.losses[name])
    assert float(want.losses["tla"].detach()) > 0.0  # the TLA term ran on real samples
    for i, (a, e) in enumerate(zip(got_g, want_g)):
        _same(a, e, f"gradient {i}")
        assert a is None or torch.isfinite(a).all(), f"gradient {i}"


def test_imputer_refuses_nan_in_an_observed_block():
    imp = OmniFuseImputer(M, D, hidden=5, num_blocks=2)
    v = torch.randn(B, M, D)
    v[4, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"v must be finite in its observed blocks.*modality 2"):
        imp(v, _observed())


def test_model_refuses_nan_in_an_observed_view_row():
    model = OmniFuse(VIEW_DIMS, 3, dim=D, hidden=5, num_blocks=2)
    views = [torch.randn(B, d) for d in VIEW_DIMS]
    views[1][5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"views\[1\] must be finite.*row 5.*observed"):
        model(views, _observed())
