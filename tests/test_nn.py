"""Modules: shapes, losses against hand formulas on the reference ops, switches, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnifuse_fast import reference as ref
from omnifuse_fast.nn import (
    CascadeResidualAutoencoder,
    DWFuseLoss,
    FrozenTextEncoder,
    MIMOBalancer,
    MLPEncoder,
    ModalityMixer,
    OmniFuse,
    OmniFuseImputer,
    TLAMiner,
    expand_subsets,
    supervision_drop,
)
from omnifuse_fast.nn.imputer import masked_block_mse
from omnifuse_fast.reference.mix import random_sources

R = "reference"


def _observed(b: int, m: int, seed: int = 0, rate: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(b, m, generator=g) >= rate
    obs[~obs.any(1), 0] = True
    return obs


def _views(b: int, dims: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) for d in dims]


# ----------------------------------------------------------------------------- CRA
def test_cra_matches_reference_and_starts_near_identity():
    torch.manual_seed(0)
    cra = CascadeResidualAutoencoder(12, 8, num_blocks=3, activation="gelu", backend=R)
    x = torch.randn(5, 12)
    out, lat = cra(x)
    want = ref.cra_forward(x, cra.w1, cra.b1, cra.w2, cra.b2, "gelu")
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(lat, want[1])
    assert out.shape == (5, 12) and lat.shape == (5, 3 * 8) and cra.latent_dim == 24
    # decoders start small: the cascade is close to the identity
    assert (out - x).norm() < 0.2 * x.norm()
    out.sum().backward()
    assert all(p.grad is not None for p in cra.parameters())


def test_cra_bad_arguments():
    with pytest.raises(ValueError, match="features"):
        CascadeResidualAutoencoder(0, 4)
    with pytest.raises(ValueError, match="activation"):
        CascadeResidualAutoencoder(4, 4, activation="softplus")


# ----------------------------------------------------------------------------- imputer
def test_supervision_drop_never_empties_a_sample():
    obs = _observed(500, 4, seed=1, rate=0.6)
    g = torch.Generator().manual_seed(3)
    present = supervision_drop(obs, 0.95, g)
    assert bool(present.any(1).all())
    assert not bool((present & ~obs).any())  # only observed entries can be present
    assert int((obs & ~present).sum()) > 0.8 * int(obs.sum() - obs.shape[0])
    assert torch.equal(supervision_drop(obs, 0.0), obs)


def _imputer(**kw) -> OmniFuseImputer:
    torch.manual_seed(0)
    args = dict(num_blocks=2, drop_rate=0.5, missing_embedding="zero_input", backend=R)
    args.update(kw)
    return OmniFuseImputer(3, 4, 6, **args)


def test_imputer_losses_match_hand_formulas():
    imp = _imputer().train()
    b, m, d = 7, 3, 4
    v = torch.randn(b, m, d)
    u = torch.randn(m, d)
    obs = _observed(b, m, seed=2, rate=0.2)
    present = supervision_drop(obs, 0.5, torch.Generator().manual_seed(0))
    out = imp(v, obs, u, present=present)

    p = present.unsqueeze(-1).float()
    v_in = p * v + (1 - p) * u
    fwd, lat = ref.cra_forward(v_in.reshape(b, m * d), *_weights(imp.forward_cra), "relu")
    fwd = fwd.view(b, m, d)
    v_hat = (1 - p) * fwd + p * u
    bwd = ref.cra_forward(v_hat.reshape(b, m * d), *_weights(imp.backward_cra), "relu")[0]
    bwd = bwd.view(b, m, d)
    o, pr = obs.unsqueeze(-1).float(), p
    l_fwd = ((fwd - v) ** 2 * o).sum() / (obs.sum() * d)
    l_bwd = ((bwd - v) ** 2 * pr).sum() / (present.sum() * d)
    torch.testing.assert_close(out.v_forward, fwd)
    torch.testing.assert_close(out.v_backward, bwd)
    torch.testing.assert_close(out.latents, lat)
    torch.testing.assert_close(out.loss_forward, l_fwd)
    torch.testing.assert_close(out.loss_backward, l_bwd)
    torch.testing.assert_close(out.v_full, p * v + (1 - p) * fwd)


def _weights(cra):
    return cra.w1, cra.b1, cra.w2, cra.b2


def test_imputer_eval_runs_forward_only_and_never_drops():
    imp = _imputer().eval()
    v, u, obs = torch.randn(6, 3, 4), torch.randn(3, 4), _observed(6, 3, seed=4)
    out = imp(v, obs, u)
    assert torch.equal(out.present, obs)
    assert out.v_backward is None
    assert float(out.loss_forward) == 0.0 and float(out.loss_backward) == 0.0


def test_imputer_training_drop_draws_from_generator():
    imp = _imputer(drop_rate=0.7).train()
    v, u, obs = torch.randn(64, 3, 4), torch.randn(3, 4), _observed(64, 3, seed=5, rate=0.1)
    a = imp(v, obs, u, generator=torch.Generator().manual_seed(9)).present
    b = imp(v, obs, u, generator=torch.Generator().manual_seed(9)).present
    assert torch.equal(a, b) and bool(a.any(1).all()) and not bool((a & ~obs).any())
    assert int(a.sum()) < int(obs.sum())


def test_imputer_detach_target_controls_gradient_into_v():
    v = torch.randn(5, 3, 4)
    u, obs = torch.randn(3, 4), torch.ones(5, 3, dtype=torch.bool)
    present = obs.clone()
    present[:, 1] = False
    grads = {}
    for detach in (True, False):
        imp = _imputer(detach_target=detach).train()
        vv = v.clone().requires_grad_(True)
        imp(vv, obs, u, present=present).loss_forward.backward()
        grads[detach] = vv.grad[:, 1].clone()  # block 1 enters only as the target
    assert torch.count_nonzero(grads[True]) == 0
    assert torch.count_nonzero(grads[False]) > 0


def test_imputer_switches_and_missing_embedding_modes():
    v, u, obs = torch.randn(4, 3, 4), torch.randn(3, 4), _observed(4, 3, seed=6)
    imp = _imputer(use_forward=False, use_backward=False).train()
    out = imp(v, obs, u)
    assert torch.equal(out.present, obs)  # nothing to supervise: no drop
    p = obs.unsqueeze(-1).float()
    torch.testing.assert_close(out.v_full, p * v + (1 - p) * u)  # missing blocks keep u
    assert out.v_backward is None and float(out.loss_forward) == 0.0
    with pytest.raises(ValueError, match="zero_input"):
        _imputer()(v, obs)
    learned = _imputer(missing_embedding="learned")
    assert learned.missing.shape == (3, 4)
    with pytest.raises(ValueError, match="learns"):
        learned(v, obs, u)
    with pytest.raises(ValueError, match="drop_rate"):
        OmniFuseImputer(3, 4, 6, drop_rate=1.0)
    with pytest.raises(ValueError, match="present"):
        _imputer()(v, obs, u, present=~obs | obs)  # not within observed


def test_masked_block_mse_empty_is_a_real_zero():
    pred = torch.randn(3, 2, 4, requires_grad=True)
    loss = masked_block_mse(pred, torch.randn(3, 2, 4), torch.zeros(3, 2, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(pred.grad) == 0


# ----------------------------------------------------------------------------- DWFuse
@pytest.mark.parametrize("detach", [True, False])
def test_dwfuse_loss_module_matches_formula(detach):
    torch.manual_seed(0)
    z = torch.randn(6, 3, 5, requires_grad=True)
    o = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    terms = DWFuseLoss(alpha=0.3, beta=0.7, detach_weight=detach, backend=R)(z, o, y)
    want = ref.dwfuse_loss(z, y, 0.7, detach) + 0.3 * F.cross_entropy(o, y)
    torch.testing.assert_close(terms.loss, want)
    torch.testing.assert_close(terms.ra, F.cross_entropy(o, y))
    g = torch.autograd.grad(terms.loss, (z, o))
    gw = torch.autograd.grad(want, (z, o))
    torch.testing.assert_close(g, gw)


def test_dwfuse_loss_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        DWFuseLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="joint_logits"):
        DWFuseLoss()(torch.randn(4, 2, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- TLA
def _hand_scores(logits, labels, comb, m, reduction):
    d = F.cross_entropy(logits, labels, reduction="none").double()
    s = torch.zeros(1 << m, dtype=torch.float64).index_add_(0, comb, d)
    n = torch.bincount(comb, minlength=1 << m)
    score = s / n.clamp_min(1) if reduction == "mean" else s
    return score.masked_fill(n == 0, float("-inf"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tla_miner_mines_argmax_over_batches(reduction):
    torch.manual_seed(0)
    miner = TLAMiner(3, reduction=reduction, backend=R)
    logits, labels = torch.randn(40, 4) * 3, torch.randint(0, 4, (40,))
    comb = torch.randint(1, 8, (40,))
    for i in range(0, 40, 16):  # several batches make one epoch
        miner.update(logits[i : i + 16], labels[i : i + 16], comb[i : i + 16])
    torch.testing.assert_close(miner.scores(), _hand_scores(logits, labels, comb, 3, reduction))
    want = int(torch.argmax(_hand_scores(logits, labels, comb, 3, reduction)))
    assert miner.mine() == want == miner.lazy
    assert (
        int(miner.epoch) == 1
        and float(miner.sums.abs().sum()) == 0
        and int(miner.counts.sum()) == 0
    )


def test_tla_miner_sum_and_mean_differ():
    # comb 1: many samples of moderate loss (largest sum); comb 2: one sample of large loss
    labels = torch.zeros(11, dtype=torch.long)
    logits = torch.zeros(11, 2)
    logits[:10, 1] = 1.0  # CE ~1.31 each
    logits[10, 1] = 5.0  # CE ~5.0
    comb = torch.tensor([1] * 10 + [2])
    results = {}
    for red in ("mean", "sum"):
        miner = TLAMiner(2, reduction=red, backend=R)
        miner.update(logits, labels, comb)
        results[red] = miner.mine()
    assert results == {"mean": 2, "sum": 1}


def test_tla_miner_ties_and_unseen_combinations():
    miner = TLAMiner(3, distance="l1", backend=R)
    logits = torch.tensor([[0.0, 50.0], [0.0, 50.0], [0.0, 50.0]])  # exact one-hot: distance 0
    labels = torch.tensor([1, 1, 1])
    miner.update(logits, labels, torch.tensor([6, 5, 6]))
    # every seen combination scores 0; unseen ones (1..4, 7) must not win; the tie goes to 5
    assert miner.mine() == 5
    wrong = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    miner.update(wrong, torch.tensor([1, 1]), torch.tensor([7, 3]))
    assert miner.mine() == 3  # equal scores: the smallest id


def test_tla_miner_empty_epoch_and_loss():
    miner = TLAMiner(2, backend=R)
    logits = torch.randn(5, 3, requires_grad=True)
    labels, comb = torch.randint(0, 3, (5,)), torch.tensor([1, 2, 3, 3, 1])
    zero = miner.loss(logits, labels, comb)
    assert float(zero) == 0.0 and miner.lazy is None
    assert miner.mine() is None and miner.lazy is None and int(miner.epoch) == 1
    miner.update(logits, labels, comb)
    lazy = miner.mine()
    torch.testing.assert_close(
        miner.loss(logits, labels, comb), ref.tla_loss(logits, labels, comb, lazy)
    )
    assert miner.mine() is None and miner.lazy == lazy  # an empty epoch keeps the last lazy


def test_tla_miner_state_dict_round_trip():
    torch.manual_seed(1)
    a = TLAMiner(3, reduction="sum", backend=R)
    a.update(torch.randn(9, 4), torch.randint(0, 4, (9,)), torch.randint(1, 8, (9,)))
    a.mine()
    a.update(torch.randn(9, 4), torch.randint(0, 4, (9,)), torch.randint(1, 8, (9,)))
    b = TLAMiner(3, reduction="sum", backend=R)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sums, b.sums) and torch.equal(a.counts, b.counts)
    assert a.lazy == b.lazy and int(a.epoch) == int(b.epoch) == 1
    assert a.mine() == b.mine()


def test_tla_miner_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        TLAMiner(3, reduction="max")
    with pytest.raises(ValueError, match="num_modalities"):
        TLAMiner(9)
    with pytest.raises(ValueError, match="mode"):
        TLAMiner(3, mode="all")


def test_expand_subsets_enumerates_every_subset_of_observed():
    obs = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    rows, present, comb = expand_subsets(obs)
    assert rows.tolist() == [0, 0, 0] + [1] * 7 + [2]
    assert comb.tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 4]
    assert torch.equal(ref.combination_ids(present), comb)
    assert not bool((present & ~obs[rows]).any())


# ----------------------------------------------------------------------------- mixer
def test_modality_mixer_matches_reference_and_restores_generator():
    torch.manual_seed(0)
    v, y = torch.randn(8, 3, 4), torch.randint(0, 5, (8,))
    mixer = ModalityMixer(3, 5, seed=11, backend=R)
    state = mixer.state_dict()
    v_mix, soft = mixer(v, y)
    src = random_sources(8, 3, torch.Generator().manual_seed(11))
    want = ref.modality_mix(v, y, src, 5)
    torch.testing.assert_close(v_mix, want[0])
    torch.testing.assert_close(soft, want[1])
    nxt = mixer.sources(8)
    other = ModalityMixer(3, 5, seed=99, backend=R)
    other.load_state_dict(state)
    other.sources(8)
    assert torch.equal(other.sources(8), nxt)  # the generator state travels in state_dict


def test_modality_mixer_weights():
    w = torch.tensor([0.5, 0.3, 0.2])
    mixer = ModalityMixer(3, 4, weights=w, backend=R)
    v, y = torch.randn(6, 3, 2), torch.randint(0, 4, (6,))
    src = mixer.sources(6)
    torch.testing.assert_close(
        mixer(v, y, src)[1], ref.modality_mix(v, y, src, 4, w.expand(6, 3))[1]
    )
    with pytest.raises(ValueError, match="sum to 1"):
        ModalityMixer(3, 4, weights=torch.tensor([0.5, 0.5, 0.5]))


# ----------------------------------------------------------------------------- MIMO
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 6)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
        self.fusion = torch.nn.Linear(6, 3)
        self.unused = torch.nn.Parameter(torch.ones(2))

    def losses(self, x, y):
        h = self.shared(x).relu()
        z = [head(h[:, 3 * i : 3 * i + 3]) for i, head in enumerate(self.heads)]
        return F.cross_entropy(self.fusion(h), y), [F.cross_entropy(zi, y) for zi in z]


def _toy():
    torch.manual_seed(0)
    model, x, y = _Toy(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, x, y


def test_mimo_balancer_sets_gradients_as_specified():
    model, x, y = _toy()
    params = list(model.shared.parameters()), [list(h.parameters()) for h in model.heads]
    fusion = list(model.fusion.parameters())
    bal = MIMOBalancer(params[0] + [model.unused], params[1], fusion, backend=R)
    l0, lm = model.losses(x, y)
    w = int(torch.argmax(torch.stack(lm)))
    d_params = params[0] + fusion + params[1][w]
    g0 = torch.autograd.grad(l0, d_params, retain_graph=True, allow_unused=True)
    gw = torch.autograd.grad(lm[w], d_params, retain_graph=True, allow_unused=True)
    g0 = [g if g is not None else torch.zeros_like(p) for g, p in zip(g0, d_params)]
    gw = [g if g is not None else torch.zeros_like(p) for g, p in zip(gw, d_params)]
    direction, lam = ref.mimo_combine(g0, gw)
    other = 1 - w
    own = torch.autograd.grad(lm[other], params[1][other], retain_graph=True)
    step = bal.backward(l0, lm)
    assert step.worst == w
    torch.testing.assert_close(step.weights, torch.stack([lam, 1 - lam]))
    for p, d in zip(d_params, direction):
        torch.testing.assert_close(p.grad, d)
    for p in fusion:  # only L_0 touches the fusion head: lam * g_0 there
        assert p.grad is not None
    for p, g in zip(params[1][other], own):
        torch.testing.assert_close(p.grad, g)
    assert model.unused.grad is None  # touched by neither: left alone
    assert bal.subroutine_seconds > 0 and bal.steps == 1


def test_mimo_balancer_mgda_mode():
    model, x, y = _toy()
    heads = [list(h.parameters()) for h in model.heads]
    shared, fusion = list(model.shared.parameters()), list(model.fusion.parameters())
    bal = MIMOBalancer(shared, heads, fusion, mode="mgda", backend=R)
    l0, lm = model.losses(x, y)
    params = shared + fusion + heads[0] + heads[1]
    grads = []
    for loss in [l0, *lm]:
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)])
    weights, direction = ref.mgda_min_norm(grads)
    step = bal.backward(l0, lm)
    torch.testing.assert_close(step.weights, weights)
    for p, d in zip(params, direction):
        torch.testing.assert_close(p.grad, d)


def test_mimo_balancer_bad_arguments():
    model, x, y = _toy()
    heads = [list(h.parameters()) for h in model.heads]
    shared = list(model.shared.parameters())
    with pytest.raises(ValueError, match="disjoint"):
        MIMOBalancer(shared + heads[0], heads)
    with pytest.raises(ValueError, match="mode"):
        MIMOBalancer(shared, heads, mode="pcgrad")
    bal = MIMOBalancer(shared, heads)
    l0, lm = model.losses(x, y)
    with pytest.raises(ValueError, match="modality_losses"):
        bal.backward(l0, lm[:1])


# ----------------------------------------------------------------------------- encoders
def test_mlp_encoder_missing_embedding_is_encoder_on_zeros():
    enc = MLPEncoder(7, 5, hidden=9)
    assert enc(torch.randn(3, 7)).shape == (3, 5)
    torch.testing.assert_close(enc.missing_embedding(), enc(torch.zeros(1, 7))[0])


def test_frozen_text_encoder_tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config)
    enc = FrozenTextEncoder(bert).train()
    assert not bert.training and enc.dim == 16
    assert not any(p.requires_grad for p in enc.parameters())
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    out = enc(ids, mask)
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    want = torch.stack([hidden[0, :4].mean(0), hidden[1].mean(0), hidden[2].mean(0)])
    assert out.shape == (3, 16) and not out.requires_grad
    torch.testing.assert_close(out, want)
    # padding beyond the mask does not change the embedding
    padded = torch.cat([ids[:1, :4], torch.zeros(1, 5, dtype=torch.long)], dim=1)
    pmask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(enc(padded, pmask)[0], out[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="model_or_path"):
        FrozenTextEncoder(3)


# ----------------------------------------------------------------------------- OmniFuse
DIMS = [5, 7, 3]


def _model(**kw) -> OmniFuse:
    torch.manual_seed(0)
    args = dict(dim=4, hidden=6, num_blocks=2, encoder_hidden=8, head_hidden=8, backend=R)
    args.update(kw)
    return OmniFuse(DIMS, 4, **args)


def _batch(b=12, seed=0):
    obs = _observed(b, 3, seed=seed)
    views = [x * obs[:, i : i + 1] for i, x in enumerate(_views(b, DIMS, seed))]
    return views, obs, torch.randint(0, 4, (b,), generator=torch.Generator().manual_seed(seed))


def test_omnifuse_shapes_and_total_matches_eq18():
    model = _model(lambdas=(0.7, 3.0, 0.25)).train()
    views, obs, y = _batch()
    model.miner.update(torch.randn(12, 4), y, ref.combination_ids(obs))
    lazy = model.miner.mine()
    out = model(views, obs, y)
    assert out.joint_logits.shape == (12, 4) and out.modality_logits.shape == (12, 3, 4)
    assert out.v_full.shape == (12, 3, 4) and torch.equal(
        out.comb, ref.combination_ids(out.present)
    )
    ls = out.losses
    assert set(ls) == {"forward", "backward", "enc", "ra", "dwfuse", "tla", "total"}
    torch.testing.assert_close(
        ls["total"], ls["forward"] + 0.7 * ls["backward"] + 3.0 * ls["dwfuse"] + 0.25 * ls["tla"]
    )
    want_dw = ref.dwfuse_loss(out.modality_logits, y, 0.5) + 0.1 * F.cross_entropy(
        out.joint_logits, y
    )
    torch.testing.assert_close(ls["dwfuse"], want_dw)
    torch.testing.assert_close(ls["tla"], ref.tla_loss(out.joint_logits, y, out.comb, lazy))
    ls["total"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)


def test_omnifuse_uses_encoders_on_zeros_as_missing_embeddings():
    model = _model().eval()
    views, obs, _ = _batch()
    out = model(views, obs)
    u = torch.stack([enc(torch.zeros(1, d))[0] for enc, d in zip(model.encoders, DIMS)])
    torch.testing.assert_close(model.missing_embeddings(), u)
    p = obs.unsqueeze(-1).float()
    v_in = p * out.embeddings + (1 - p) * u
    fwd = ref.cra_forward(v_in.flatten(1), *_weights(model.imputer.forward_cra))[0]
    torch.testing.assert_close(out.v_full, p * out.embeddings + (1 - p) * fwd.view(12, 3, 4))
    assert out.losses == {}


@pytest.mark.parametrize(
    "flags,keys",
    [
        (
            dict(use_dwfuse=False, use_tla=False, use_imp_forward=False, use_imp_backward=False),
            {"ce", "total"},
        ),
        (
            dict(use_tla=False, use_imp_forward=False, use_imp_backward=False),
            {"enc", "ra", "dwfuse", "total"},
        ),
        (
            dict(use_imp_forward=False, use_imp_backward=False),
            {"enc", "ra", "dwfuse", "tla", "total"},
        ),
        (dict(use_imp_backward=False), {"forward", "enc", "ra", "dwfuse", "tla", "total"}),
        (dict(use_tla=False), {"forward", "backward", "enc", "ra", "dwfuse", "total"}),
    ],
)
def test_omnifuse_ablation_switches(flags, keys):
    model = _model(**flags).train()
    views, obs, y = _batch()
    out = model(views, obs, y)
    assert set(out.losses) == keys
    if not flags.get("use_dwfuse", True):  # concat baseline: no cascade, CE of the concat head
        assert model.imputer is None
        assert model.fusion_head[0].in_features == 3 * 4
        torch.testing.assert_close(out.losses["total"], 10.0 * F.cross_entropy(out.joint_logits, y))
        assert torch.equal(out.present, obs)
    if not flags.get("use_imp_forward", True):  # no imputation: no drop, missing blocks keep u
        assert torch.equal(out.present, obs)
        p = obs.unsqueeze(-1).float()
        u = model.missing_embeddings()
        torch.testing.assert_close(out.v_full, p * out.embeddings + (1 - p) * u)


def test_omnifuse_predict_proba_and_state_dict_round_trip():
    model = _model().train()
    views, obs, y = _batch()
    model.miner.update(torch.randn(12, 4), y, ref.combination_ids(obs))
    model.miner.mine()
    proba = model.predict_proba(views, obs)
    assert model.training  # restored
    model.eval()
    torch.testing.assert_close(proba, torch.softmax(model(views, obs).joint_logits, 1))
    torch.testing.assert_close(proba.sum(1), torch.ones(12))
    clone = _model()
    clone.load_state_dict(model.state_dict())
    assert clone.miner.lazy == model.miner.lazy
    torch.testing.assert_close(clone.predict_proba(views, obs), proba)


def test_omnifuse_subsets_mode():
    model = _model(tla_mode="subsets").train()
    views, obs, y = _batch()
    out = model(views, obs, y)
    assert float(out.losses["tla"]) == 0.0  # nothing mined yet
    model.tla_observe(out, obs, y)
    sizes = (2 ** obs.sum(1) - 1).sum()
    assert int(model.miner.counts.sum()) == int(sizes)
    lazy = model.miner.mine()
    out = model(views, obs, y)
    # the TLA term: samples whose observed set holds lazy, predicted from lazy alone
    obs_comb = ref.combination_ids(obs)
    idx = torch.nonzero((obs_comb & lazy) == lazy).flatten()
    bits = torch.tensor([(lazy >> i) & 1 for i in range(3)], dtype=torch.bool)
    model.eval()
    sub = model([x[idx] for x in views], obs[idx], present=bits.expand(len(idx), 3).clone())
    torch.testing.assert_close(out.losses["tla"], F.cross_entropy(sub.joint_logits, y[idx]))


def test_omnifuse_mimo_groups_and_mix_path():
    model = _model()
    shared, heads, fusion = model.parameter_groups()
    assert len(heads) == 3
    n = len(shared) + len(fusion) + sum(len(h) for h in heads)
    assert n == len(list(model.parameters()))
    logits = model.joint_logits_from_embeddings(torch.randn(5, 3, 4))
    assert logits.shape == (5, 4)


def test_omnifuse_bad_arguments():
    with pytest.raises(ValueError, match="view_dims"):
        OmniFuse([5], 3)
    with pytest.raises(ValueError, match="lambdas"):
        OmniFuse(DIMS, 3, lambdas=(1.0, 2.0))
    with pytest.raises(ValueError, match="backend"):
        OmniFuse(DIMS, 3, backend="fast")
    with pytest.raises(ValueError, match="num_classes"):
        OmniFuse(DIMS, 1)
    model = _model()
    views, obs, _ = _batch()
    with pytest.raises(ValueError, match="views"):
        model(views[:2], obs)
    with pytest.raises(ValueError, match="views\\[1\\]"):
        model([views[0], views[0], views[2]], obs)
    with pytest.raises(ValueError, match="observed"):
        model(views, torch.zeros_like(obs))


def test_omnifuse_auto_backend_agrees_with_reference():
    model = _model().train()
    views, obs, y = _batch()
    present = supervision_drop(obs, 0.3, torch.Generator().manual_seed(0))
    want = model(views, obs, y, present=present).losses
    model.backend = "auto"
    got = model(views, obs, y, present=present).losses
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_branch_free_drop_equals_the_branchy_one():
    """The drop restores an emptied row without a host branch; the mask is the one a branchy
    version (restore only when some row is empty) gives from the same draw."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        obs = torch.rand(16, 4, generator=g) < 0.6
        obs[:, 0] |= ~obs.any(dim=1)
        got = supervision_drop(obs, 0.7, torch.Generator().manual_seed(seed))
        draw = torch.rand(obs.shape, generator=torch.Generator().manual_seed(seed))
        want = obs & (draw >= 0.7)
        empty = ~want.any(dim=1)
        if bool(empty.any()):
            keep = torch.where(obs, draw, torch.full_like(draw, -1.0)).argmax(dim=1)
            want[empty, keep[empty]] = True
        assert torch.equal(got, want)


def test_miner_loss_reads_the_lazy_id_as_a_tensor_and_equals_tla_loss():
    import omnifuse_fast as of

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)
    comb = torch.randint(1, 8, (12,), generator=g)
    for backend in of.available_backends("cpu"):
        miner = TLAMiner(3, backend=backend)
        for lazy in range(1, 8):
            miner.lazy = lazy
            want = of.tla_loss(logits, labels, comb, lazy, backend=backend)
            assert torch.equal(miner.loss(logits, labels, comb), want), (backend, lazy)
