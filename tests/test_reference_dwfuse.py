"""Reference DWFuse (SPEC section 2) against hand-computed cases and independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol

import omnifuse_fast as of


def make(bsz, nmod, ncls, seed=0, scale=2.0, dtype=torch.float32, multilabel=False):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(bsz, nmod, ncls, generator=g, dtype=torch.float64) * scale).to(dtype)
    if multilabel:
        y = torch.randint(0, 2, (bsz, ncls), generator=g).to(dtype)
    else:
        y = torch.randint(0, ncls, (bsz,), generator=g)
    return z, y


# Independent formulas: probabilities first, then the direct product of complements.


def loop_probs(z, y):
    """p[b][m] (multiclass) or p[b][m][l] (multilabel): probability of the correct value."""
    z = z.double().tolist()
    bsz, nmod = len(z), len(z[0])
    if y.dim() == 2:
        y = y.tolist()
        return [
            [
                [
                    1.0 / (1.0 + math.exp(-zl)) if y[b][lab] == 1 else 1.0 / (1.0 + math.exp(zl))
                    for lab, zl in enumerate(z[b][m])
                ]
                for m in range(nmod)
            ]
            for b in range(bsz)
        ]
    y = y.tolist()
    probs = []
    for b in range(bsz):
        row = []
        for m in range(nmod):
            top = max(z[b][m])
            den = sum(math.exp(v - top) for v in z[b][m])
            row.append(math.exp(z[b][m][y[b]] - top) / den)
        probs.append(row)
    return probs


def loop_omega(z, y, beta):
    """omega[b, m] = prod_{n != m} (1 - p[b, n]) ** (beta / (M - 1)) (per label, multilabel)."""
    p = torch.tensor(loop_probs(z, y), dtype=torch.float64)
    nmod = p.shape[1]
    out = torch.ones_like(p)
    for m in range(nmod):
        for n in range(nmod):
            if n != m:
                out[:, m] *= (1.0 - p[:, n]) ** (beta / (nmod - 1))
    return out


def loop_loss(z, y, beta):
    """(1/B) sum_b sum_m omega * CE, CE = -log p (multilabel: BCE averaged over labels)."""
    p = torch.tensor(loop_probs(z, y), dtype=torch.float64)
    omega = loop_omega(z, y, beta)
    per = omega * -torch.log(p)
    if y.dim() == 2:
        per = per.mean(dim=-1)
    return per.sum(dim=1).mean()


def torch_independent_loss(z, y, beta, detach):
    """The same formula with differentiable torch ops (softmax, power), for gradients."""
    nmod = z.shape[1]
    if y.dim() == 2:
        s = torch.sigmoid(z)
        p = torch.where(y.unsqueeze(1) == 1, s, 1 - s)
    else:
        p = torch.softmax(z, dim=-1).gather(-1, y.view(-1, 1, 1).expand(-1, nmod, 1)).squeeze(-1)
    comp = (1 - p) ** (beta / (nmod - 1))
    omega = torch.stack(
        [torch.stack([comp[:, n] for n in range(nmod) if n != m]).prod(0) for m in range(nmod)],
        dim=1,
    )
    if detach:
        omega = omega.detach()
    per = omega * -torch.log(p)
    if y.dim() == 2:
        per = per.mean(-1)
    return per.sum(1).mean()


def test_hand_computed_m2_c2():
    # modality 0: p = 1/2; modality 1: softmax([log 3, 0])[0] = 3/4
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], dtype=torch.float64)
    y = torch.tensor([0])
    omega = of.dwfuse_weights(z, y, beta=0.5, backend="reference")
    want = torch.tensor([[math.sqrt(1 - 0.75), math.sqrt(1 - 0.5)]], dtype=torch.float64)
    torch.testing.assert_close(omega, want, rtol=1e-12, atol=1e-12)
    loss = of.dwfuse_loss(z, y, beta=0.5, backend="reference")
    want_loss = 0.5 * math.log(2.0) + math.sqrt(0.5) * math.log(4.0 / 3.0)
    assert abs(float(loss) - want_loss) < 1e-12


def test_hand_computed_m3_beta1():
    # p = (1/2, 1/4, 0 (almost)): omega_m = prod_{n != m} (1 - p_n) ** (1/2)
    z = torch.tensor(
        [[[0.0, 0.0, -1e9], [0.0, math.log(3.0), -1e9], [-1e9, 0.0, -1e9]]], dtype=torch.float64
    )
    y = torch.tensor([0])
    omega = of.dwfuse_weights(z, y, beta=1.0, backend="reference")
    want = [[math.sqrt(0.75 * 1.0), math.sqrt(0.5 * 1.0), math.sqrt(0.5 * 0.75)]]
    torch.testing.assert_close(omega, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_hand_computed_multilabel():
    # M=2, C=2; label row [1, 0]. z = 0 -> p = 1/2; z_{1,0} = log 3 -> p = 3/4 (label 1)
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), math.log(3.0)]]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    omega = of.dwfuse_weights(z, y, beta=1.0, backend="reference", multilabel=True)
    # label 0 (y=1): p = (1/2, 3/4); label 1 (y=0): p = (1/2, 1/4)
    want = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(omega, want, rtol=1e-12, atol=1e-12)
    loss = of.dwfuse_loss(z, y, beta=1.0, backend="reference", multilabel=True)
    bce = [[-math.log(0.5), -math.log(0.5)], [-math.log(0.75), -math.log(0.25)]]
    want_loss = sum(sum(want[0, m, k].item() * bce[m][k] for k in range(2)) / 2 for m in range(2))
    assert abs(float(loss) - want_loss) < 1e-12


@pytest.mark.parametrize(
    "bsz,nmod,ncls,beta",
    [(5, 2, 3, 0.5), (4, 3, 2, 0.5), (3, 5, 7, 1.3), (2, 8, 4, 0.5), (1, 4, 3, 0.0)],
)
@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_weights_and_loss_match_loop(bsz, nmod, ncls, beta, multilabel):
    z, y = make(bsz, nmod, ncls, seed=bsz * nmod, dtype=torch.float64, multilabel=multilabel)
    omega = of.dwfuse_weights(z, y, beta=beta, backend="reference", multilabel=multilabel)
    want_shape = (bsz, nmod, ncls) if multilabel else (bsz, nmod)
    assert omega.shape == want_shape and omega.dtype == torch.float64
    torch.testing.assert_close(omega, loop_omega(z, y, beta), rtol=1e-10, atol=1e-12)
    for detach in (True, False):
        loss = of.dwfuse_loss(
            z, y, beta=beta, detach_weight=detach, backend="reference", multilabel=multilabel
        )
        assert loss.dim() == 0
        torch.testing.assert_close(loss, loop_loss(z, y, beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_fp32_matches_loop(multilabel):
    z, y = make(6, 4, 5, seed=21, multilabel=multilabel)
    omega = of.dwfuse_weights(z, y, backend="reference", multilabel=multilabel)
    assert omega.dtype == torch.float32
    torch.testing.assert_close(omega.double(), loop_omega(z, y, 0.5), rtol=1e-5, atol=1e-6)
    loss = of.dwfuse_loss(z, y, backend="reference", multilabel=multilabel)
    torch.testing.assert_close(loss.double(), loop_loss(z, y, 0.5), rtol=1e-5, atol=1e-6)


def test_beta_zero_gives_unit_weights():
    z, y = make(3, 4, 5, seed=2)
    omega = of.dwfuse_weights(z, y, beta=0.0, backend="reference")
    assert torch.equal(omega, torch.ones(3, 4))


def test_own_logits_do_not_move_own_weight():
    """omega_m depends only on the other modalities."""
    z, y = make(4, 3, 5, seed=8, dtype=torch.float64)
    z2 = z.clone()
    z2[:, 1] += torch.randn(4, 5, dtype=torch.float64) * 3
    w, w2 = (of.dwfuse_weights(t, y, backend="reference") for t in (z, z2))
    torch.testing.assert_close(w[:, 1], w2[:, 1], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(w[:, 0], w2[:, 0])


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
@pytest.mark.parametrize("detach", [True, False], ids=["detach", "no-detach"])
def test_gradient_matches_independent_formula(multilabel, detach):
    z, y = make(4, 3, 4, seed=13, dtype=torch.float64, multilabel=multilabel)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    of.dwfuse_loss(
        z1, y, beta=0.7, detach_weight=detach, backend="reference", multilabel=multilabel
    ).backward()
    torch_independent_loss(z2, y, 0.7, detach).backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_detach_modes_differ_in_gradient_only():
    z, y = make(3, 3, 4, seed=4, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = of.dwfuse_loss(za, y, detach_weight=True, backend="reference")
    lb = of.dwfuse_loss(zb, y, detach_weight=False, backend="reference")
    assert la.item() == lb.item()
    la.backward()
    lb.backward()
    assert not torch.allclose(za.grad, zb.grad)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_gradcheck(multilabel):
    z, y = make(3, 3, 4, seed=5, dtype=torch.float64, multilabel=multilabel)
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: of.dwfuse_weights(t, y, beta=0.8, backend="reference", multilabel=multilabel),
        (z,),
    )
    assert torch.autograd.gradcheck(
        lambda t: of.dwfuse_loss(
            t, y, beta=0.8, detach_weight=False, backend="reference", multilabel=multilabel
        ),
        (z,),
    )


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_detached_gradient_finite_differences(multilabel):
    """detach_weight=True: the gradient is that of sum(omega0 * CE(z)) with omega0 held fixed.

    (gradcheck of the op itself cannot pass here by design: the value depends on omega(z) but
    the gradient deliberately ignores it), so differentiate the fixed-weight loss numerically.
    """
    z, y = make(3, 3, 4, seed=6, dtype=torch.float64, multilabel=multilabel)
    omega0 = loop_omega(z, y, 0.8)

    def fixed_weight_loss(t):
        p = torch.tensor(loop_probs(t, y), dtype=torch.float64)
        per = omega0 * -torch.log(p)
        return float((per.mean(-1) if multilabel else per).sum(1).mean())

    numeric = torch.zeros_like(z)
    eps = 1e-6
    for idx in range(z.numel()):
        zp, zm = z.clone(), z.clone()
        zp.view(-1)[idx] += eps
        zm.view(-1)[idx] -= eps
        numeric.view(-1)[idx] = (fixed_weight_loss(zp) - fixed_weight_loss(zm)) / (2 * eps)
    zz = z.clone().requires_grad_()
    of.dwfuse_loss(
        zz, y, beta=0.8, detach_weight=True, backend="reference", multilabel=multilabel
    ).backward()
    torch.testing.assert_close(zz.grad, numeric, rtol=1e-6, atol=1e-8)


def _extreme_logits(nmod=3, ncls=4):
    """fp32 logits of +-1e4: p is exactly 1 or exactly 0 in floating point."""
    z = torch.full((3, nmod, ncls), -1e4)
    y = torch.tensor([0, 1, 3])
    z[0, :, 0] = 1e4  # sample 0: every modality certain and right (p = 1)
    z[1, :, 0] = 1e4  # sample 1: every modality certain and wrong (p = 0)
    z[2, 0, 3] = 1e4  # sample 2: modality 0 right, the others wrong
    z[2, 1:, 0] = 1e4
    return z, y


def test_extreme_probabilities_multiclass():
    z, y = _extreme_logits()
    omega = of.dwfuse_weights(z, y, backend="reference")
    assert torch.isfinite(omega).all() and (omega >= 0).all() and (omega <= 1).all()
    assert torch.equal(omega[0], torch.zeros(3))  # the others are right: 1 - p = 0
    assert torch.equal(omega[1], torch.ones(3))  # the others are wrong: 1 - p = 1
    assert torch.equal(omega[2], torch.tensor([1.0, 0.0, 0.0]))
    for detach in (True, False):
        zz = z.clone().requires_grad_()
        loss = of.dwfuse_loss(zz, y, detach_weight=detach, backend="reference")
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(zz.grad).all()
    # CE of the wrong-and-certain modalities is 2e4 each; weight 1 on sample 1's three
    loss = of.dwfuse_loss(z, y, backend="reference")
    torch.testing.assert_close(loss, torch.tensor((3 * 2e4 + 1 * 0.0) / 3), rtol=1e-6, atol=0)


def test_extreme_probabilities_multilabel():
    z = torch.tensor([[[1e4, -1e4], [1e4, -1e4]], [[-1e4, 1e4], [1e4, 1e4]]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    omega = of.dwfuse_weights(z, y, backend="reference", multilabel=True)
    assert torch.isfinite(omega).all() and (omega >= 0).all() and (omega <= 1).all()
    # sample 0: every label right in both modalities -> 0. Sample 1: modality 0 is wrong on
    # both labels, modality 1 right on label 0 (p = 1) and wrong on label 1 (p = 0).
    assert torch.equal(omega[0], torch.zeros(2, 2))
    assert torch.equal(omega[1], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    for detach in (True, False):
        zz = z.clone().requires_grad_()
        loss = of.dwfuse_loss(zz, y, detach_weight=detach, backend="reference", multilabel=True)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zz.grad).all()


@pytest.mark.parametrize("nmod", [2, 8])
def test_batch_one_c2(nmod):
    z, y = make(1, nmod, 2, seed=nmod, dtype=torch.float64)
    torch.testing.assert_close(
        of.dwfuse_weights(z, y, backend="reference"), loop_omega(z, y, 0.5), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        of.dwfuse_loss(z, y, backend="reference"), loop_loss(z, y, 0.5), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_low_precision(dtype, multilabel):
    z, y = make(6, 3, 5, seed=9, dtype=dtype, multilabel=multilabel)
    omega = of.dwfuse_weights(z, y, backend="reference", multilabel=multilabel)
    loss = of.dwfuse_loss(z, y, backend="reference", multilabel=multilabel)
    assert omega.dtype == loss.dtype == dtype
    y32 = y.float() if multilabel else y
    torch.testing.assert_close(
        omega.float(),
        of.dwfuse_weights(z.float(), y32, backend="reference", multilabel=multilabel),
        **tol(dtype),
    )
    torch.testing.assert_close(
        loss.float(),
        of.dwfuse_loss(z.float(), y32, backend="reference", multilabel=multilabel),
        **tol(dtype),
    )
    zz = z.clone().requires_grad_()
    of.dwfuse_loss(
        zz, y, detach_weight=False, backend="reference", multilabel=multilabel
    ).backward()
    assert zz.grad.dtype == dtype and torch.isfinite(zz.grad).all()


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_non_contiguous_inputs(multilabel):
    z, y = make(8, 3, 4, seed=14, multilabel=multilabel)
    zv = z.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    yv = torch.stack([y, y], dim=-1)[..., 0]  # a strided view of y
    assert not zv.is_contiguous() and not yv.is_contiguous()
    for fn in (of.dwfuse_weights, of.dwfuse_loss):
        torch.testing.assert_close(
            fn(zv, yv, backend="reference", multilabel=multilabel),
            fn(z, y, backend="reference", multilabel=multilabel),
        )


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_fp32_large_logits_lose_no_precision(offset):
    """Logits near +-1e4 in fp32: omega and the loss match the fp64 reference of the very same
    fp32 values to ~1e-6 relative (two absolute logsumexps would lose ~5e-4)."""
    g = torch.Generator().manual_seed(0)
    z = offset + torch.randn(64, 3, 5, generator=g) * 3.0
    z[:, :, 0] -= 2 * offset  # the other extreme in the same rows
    y = torch.randint(0, 5, (64,), generator=g)
    w32 = of.dwfuse_weights(z, y, backend="reference")
    w64 = of.dwfuse_weights(z.double(), y, backend="reference")
    torch.testing.assert_close(w32.double(), w64, rtol=5e-6, atol=1e-30)
    l32 = of.dwfuse_loss(z, y, backend="reference")
    l64 = of.dwfuse_loss(z.double(), y, backend="reference")
    torch.testing.assert_close(l32.double(), l64, rtol=5e-6, atol=0.0)
