"""Reference CRA cascade (SPEC section 1) against hand-computed cases and an independent loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol

import omnifuse_fast as of

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def _act(name: str, x: float) -> float:
    """The activations written out from their definitions (GELU: the exact erf form)."""
    if name == "relu":
        return max(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + math.exp(-x))
    return math.tanh(x)


def loop_cra(x, w1, b1, w2, b2, activation):
    """``s_0 = x``, ``s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) + b2_k``, scalar by scalar."""
    x, w1, b1, w2, b2 = (t.double().tolist() for t in (x, w1, b1, w2, b2))
    k_count, hid, feat = len(w1), len(w1[0]), len(x[0])
    outs, lats = [], []
    for row in x:
        s = list(row)  # running sum s_{k-1}
        lat = []
        for k in range(k_count):
            c = [
                _act(activation, sum(w1[k][h][f] * s[f] for f in range(feat)) + b1[k][h])
                for h in range(hid)
            ]
            phi = [sum(w2[k][f][h] * c[h] for h in range(hid)) + b2[k][f] for f in range(feat)]
            s = [s[f] + phi[f] for f in range(feat)]
            lat.extend(c)  # block k of the latents is c_k
        outs.append(s)
        lats.append(lat)
    return torch.tensor(outs, dtype=torch.float64), torch.tensor(lats, dtype=torch.float64)


def make(bsz, feat, hid, k, dtype=torch.float32, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return r(bsz, feat), r(k, hid, feat), r(k, hid), r(k, feat, hid), r(k, feat)


def test_hand_computed_k1_and_k2():
    x = torch.tensor([[1.0, 2.0]])
    w1 = torch.tensor([[[1.0, 1.0]]])  # K=1, H=1, F=2
    b1 = torch.zeros(1, 1)
    w2 = torch.tensor([[[1.0], [2.0]]])
    b2 = torch.zeros(1, 2)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="reference")
    # c = relu(1 + 2) = 3; out = x + [3, 6]
    assert torch.equal(out, torch.tensor([[4.0, 8.0]]))
    assert torch.equal(lat, torch.tensor([[3.0]]))
    # Two copies: s_1 = [4, 8], c_2 = 12, s_2 = [4 + 12, 8 + 24]
    rep = [t.repeat(2, *([1] * (t.dim() - 1))) for t in (w1, b1, w2, b2)]
    out, lat = of.cra_forward(x, *rep, backend="reference")
    assert torch.equal(out, torch.tensor([[16.0, 32.0]]))
    assert torch.equal(lat, torch.tensor([[3.0, 12.0]]))


def test_hand_computed_bias_and_negative_latent():
    x = torch.tensor([[1.0, -1.0]])
    w1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # H=2: picks x_0 and x_1
    b1 = torch.tensor([[0.5, 0.0]])
    w2 = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    b2 = torch.tensor([[0.0, 0.25]])
    out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="reference")
    # c = relu([1.5, -1]) = [1.5, 0]; phi = [1.5, 0] + [0, 0.25]
    assert torch.equal(lat, torch.tensor([[1.5, 0.0]]))
    assert torch.equal(out, torch.tensor([[2.5, -0.75]]))
    _, lat_tanh = of.cra_forward(x, w1, b1, w2, b2, activation="tanh", backend="reference")
    torch.testing.assert_close(lat_tanh, torch.tensor([[math.tanh(1.5), math.tanh(-1.0)]]))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 5])
def test_matches_loop(activation, k):
    x, w1, b1, w2, b2 = make(3, 6, 4, k, scale=0.4, seed=k)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, activation=activation, backend="reference")
    want_out, want_lat = loop_cra(x, w1, b1, w2, b2, activation)
    assert out.shape == (3, 6) and lat.shape == (3, k * 4)
    assert out.dtype == lat.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat.double(), want_lat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_loop_fp64_tight(activation):
    x, w1, b1, w2, b2 = make(2, 5, 3, 3, dtype=torch.float64, seed=7)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, activation=activation, backend="reference")
    want_out, want_lat = loop_cra(x, w1, b1, w2, b2, activation)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lat, want_lat, rtol=1e-12, atol=1e-12)


def test_latent_blocks_are_each_stage():
    """Block k of the latents is c_k: running stage k alone on s_{k-1} gives the same block."""
    x, w1, b1, w2, b2 = make(4, 6, 3, 5, dtype=torch.float64, seed=3)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="reference")
    s = x
    for k in range(5):
        s_k, c_k = of.cra_forward(
            s, w1[k : k + 1], b1[k : k + 1], w2[k : k + 1], b2[k : k + 1], backend="reference"
        )
        torch.testing.assert_close(lat[:, 3 * k : 3 * (k + 1)], c_k, rtol=1e-12, atol=1e-12)
        s = s_k
    torch.testing.assert_close(out, s, rtol=1e-12, atol=1e-12)


def test_zero_weights_are_identity():
    x, w1, b1, w2, b2 = make(2, 4, 3, 2, seed=1)
    zero = [torch.zeros_like(t) for t in (w1, w2, b2)]
    out, lat = of.cra_forward(x, zero[0], b1, zero[1], zero[2], backend="reference")
    assert torch.equal(out, x)
    assert torch.equal(lat, torch.relu(b1).reshape(1, -1).expand(2, -1))


def test_batch_one():
    x, w1, b1, w2, b2 = make(1, 4, 2, 2, seed=4)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="reference")
    want_out, want_lat = loop_cra(x, w1, b1, w2, b2, "relu")
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat.double(), want_lat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_all_inputs(activation):
    args = [t.requires_grad_() for t in make(3, 4, 3, 2, dtype=torch.float64, seed=11)]

    def fn(x, w1, b1, w2, b2):
        return of.cra_forward(x, w1, b1, w2, b2, activation=activation, backend="reference")

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_and_closeness(dtype):
    x, w1, b1, w2, b2 = make(4, 8, 4, 3, dtype=dtype, seed=5)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, activation="gelu", backend="reference")
    assert out.dtype == lat.dtype == dtype
    ref = of.cra_forward(
        *(t.float() for t in (x, w1, b1, w2, b2)), activation="gelu", backend="reference"
    )
    torch.testing.assert_close(out.float(), ref[0], **tol(dtype))
    torch.testing.assert_close(lat.float(), ref[1], **tol(dtype))


def test_gradients_flow_to_every_input_fp32():
    args = [t.requires_grad_() for t in make(3, 4, 3, 2, seed=2)]
    out, lat = of.cra_forward(*args, backend="reference")
    (out.square().sum() + lat.sum()).backward()
    for t in args:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_non_contiguous_inputs():
    x, w1, b1, w2, b2 = make(3, 6, 4, 2, seed=12)
    views = (
        x.t().contiguous().t(),
        w1.transpose(1, 2).contiguous().transpose(1, 2),
        b1.t().contiguous().t(),
        w2.transpose(1, 2).contiguous().transpose(1, 2),
        b2.t().contiguous().t(),
    )
    assert not any(v.is_contiguous() for v in views)
    got = of.cra_forward(*views, activation="silu", backend="reference")
    want = of.cra_forward(x, w1, b1, w2, b2, activation="silu", backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
