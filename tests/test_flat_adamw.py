"""FlatAdamW (omnifuse_fast/train/flat_adamw.py) against torch's AdamW, and its state."""

from __future__ import annotations

import pytest
import torch

from omnifuse_fast.train.flat_adamw import FlatAdamW, flat_adamw_supported

SHAPES = [(16, 7), (16,), (5, 3, 2), (1,), (33, 64), (9,)]
# One flat kernel rounds a few elements (those in another vector tail) differently from torch's
# per-tensor kernel: an ulp or so, never more.
TOL = dict(rtol=1e-5, atol=1e-6)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("skip", [(), (1,), (0, 4)], ids=["all", "one-without-grad", "two"])
def test_matches_torch_adamw_and_skips_parameters_without_gradients(skip):
    ref_params, flat_params = _params(0), _params(0)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, fused=True)
    flat = FlatAdamW(flat_params, lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in flat_params]
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        ref.zero_grad(set_to_none=True)
        flat.zero_grad(set_to_none=True)
        for i, (a, b) in enumerate(zip(ref_params, flat_params, strict=True)):
            grad = torch.randn(a.shape, generator=g) * (1 + step % 3)
            a.grad = None if i in skip else grad.clone()
            b.grad = None if i in skip else grad.clone()
        ref.step()
        flat.step()
    for i, (a, b) in enumerate(zip(ref_params, flat_params, strict=True)):
        torch.testing.assert_close(b, a, **TOL)
        if i in skip:
            assert torch.equal(b, before[i])  # untouched, as torch leaves it (no decay)
        else:
            assert not torch.equal(b, before[i])
    rs, fs = ref.state_dict()["state"], flat.torch_state_dict()["state"]
    assert sorted(rs) == sorted(fs) == [i for i in range(len(SHAPES)) if i not in skip]
    for i in rs:
        assert float(fs[i]["step"]) == float(rs[i]["step"]) == 20
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fs[i][key], rs[i][key], **TOL)


def test_parameters_are_views_of_one_flat_storage_and_stay_so():
    params = _params(2)
    values = [p.detach().clone() for p in params]
    opt = FlatAdamW(params)
    storage = opt.flat.untyped_storage().data_ptr()
    for p, v in zip(params, values, strict=True):
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert torch.equal(p, v)  # the values moved, unchanged
        assert p.untyped_storage().data_ptr() == storage
    module = torch.nn.ParameterList(params)
    state = {k: torch.zeros_like(v) for k, v in module.state_dict().items()}
    module.load_state_dict(state)  # copies in place: the flat tensor sees it
    assert torch.count_nonzero(opt.flat) == 0


@pytest.mark.parametrize("layout", ["flat", "torch"])
def test_state_dict_round_trip_resumes_bit_exactly(layout):
    straight_params, resumed_params = _params(3), _params(3)
    straight = FlatAdamW(straight_params, lr=3e-3, weight_decay=0.01)
    for params, opt in ((straight_params, straight),):
        _steps(opt, params, range(10))
    first = FlatAdamW(resumed_params, lr=3e-3, weight_decay=0.01)
    _steps(first, resumed_params, range(5))
    saved = first.state_dict() if layout == "flat" else first.torch_state_dict()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in resumed_params]
    resumed = FlatAdamW(fresh_params, lr=1.0, weight_decay=0.5)  # the state sets them back
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 3e-3
    _steps(resumed, fresh_params, range(5, 10))
    for a, b in zip(straight_params, fresh_params, strict=True):
        assert torch.equal(a, b)


def test_loads_a_torch_adamw_state_dict():
    """Checkpoints written with torch.optim.AdamW (before FlatAdamW) resume."""
    ref_params, flat_params = _params(4), _params(4)
    ref = torch.optim.AdamW(ref_params, lr=1e-3, weight_decay=1e-4, fused=True)
    _steps(ref, ref_params, range(4))
    with torch.no_grad():
        for a, b in zip(ref_params, flat_params, strict=True):
            b.copy_(a)
    flat = FlatAdamW(flat_params, lr=1e-3, weight_decay=1e-4)
    flat.load_state_dict(ref.state_dict())
    _steps(ref, ref_params, range(4, 8))
    _steps(flat, flat_params, range(4, 8))
    for a, b in zip(ref_params, flat_params, strict=True):
        torch.testing.assert_close(b, a, **TOL)


def _steps(opt, params, steps):
    for step in steps:
        opt.zero_grad()
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_bad_state_and_inputs_are_refused_by_name():
    opt = FlatAdamW(_params(5))
    other = FlatAdamW([torch.nn.Parameter(torch.zeros(3))])
    _steps(other, other.params, range(1))
    with pytest.raises(ValueError, match="exp_avg has shape"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="exp_avg of parameter 0 has shape"):
        opt.load_state_dict(other.torch_state_dict())
    bad = opt.torch_state_dict()
    bad["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": 0, "exp_avg_sq": 0}, 9: {}}
    bad["state"][9] = {"step": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="step counts differ"):
        opt.load_state_dict(bad)
    assert not flat_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    assert not flat_adamw_supported([])
    with pytest.raises(ValueError, match="one dtype"):
        FlatAdamW([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2).double())])


def test_lr_change_in_param_groups_applies():
    a, b = _params(7), _params(7)
    oa, ob = FlatAdamW(a, lr=1e-3), FlatAdamW(b, lr=1e-3)
    ob.param_groups[0]["lr"] = 0.0
    _steps(oa, a, range(2))
    _steps(ob, b, range(2))
    assert not torch.equal(a[0], _params(7)[0])
    for p, q in zip(b, _params(7), strict=True):  # lr 0 (and so no decay): unchanged
        assert torch.equal(p, q)


def test_a_step_that_read_the_flat_tensor_leaves_one_gradient():
    """A step can take the flat tensor itself as input (split into the parameters' shapes):
    its whole gradient lands in flat.grad, which the step uses as it is."""
    split_params, own_params = _params(8), _params(8)
    split_opt, own_opt = FlatAdamW(split_params, lr=1e-2), FlatAdamW(own_params, lr=1e-2)
    assert split_opt.flat.is_leaf and split_opt.flat.requires_grad
    g = torch.Generator().manual_seed(9)
    targets = [torch.randn(s, generator=g) for s in SHAPES]
    for _ in range(3):
        for opt in (split_opt, own_opt):
            opt.zero_grad()
        pieces = split_opt.flat.split([p.numel() for p in split_params])
        views = [t.view(p.shape) for t, p in zip(pieces, split_params, strict=True)]
        sum(((v - t) ** 2).sum() for v, t in zip(views, targets, strict=True)).backward()
        sum(((p - t) ** 2).sum() for p, t in zip(own_params, targets, strict=True)).backward()
        assert all(p.grad is None for p in split_params) and split_opt.flat.grad is not None
        split_opt.step()
        own_opt.step()
    for a, b in zip(split_params, own_params, strict=True):
        assert torch.equal(a, b)
    split_opt.zero_grad()
    assert split_opt.flat.grad is None
    split_opt.flat.grad = torch.zeros_like(split_opt.flat)
    split_params[0].grad = torch.zeros_like(split_params[0])
    with pytest.raises(ValueError, match="flat.grad and the gradients of parameters"):
        split_opt.step()
