"""Errors in the user's terms: each names the argument the user passed and says what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import omnifuse_fast as of
from omnifuse_fast.data.adapters import load_data
from omnifuse_fast.nn import DWFuseLoss, OmniFuse, OmniFuseImputer, TLAMiner


def test_fp64_v_into_an_fp32_imputer_names_v_and_the_fix():
    imp = OmniFuseImputer(3, 4, hidden=5, num_blocks=2)
    v = torch.randn(6, 3, 4, dtype=torch.float64)
    with pytest.raises(
        TypeError,
        match=r"v is float64 while the OmniFuseImputer's parameters are "
        r"float32: cast the input \(v\.to\(torch\.float32\)\)",
    ):
        imp(v, torch.ones(6, 3, dtype=torch.bool))


def test_low_precision_v_under_autocast_is_accepted():
    imp = OmniFuseImputer(3, 4, hidden=5, num_blocks=2, backend="reference")
    v = torch.randn(6, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = imp(v, torch.ones(6, 3, dtype=torch.bool))
    assert out.v_full.dtype == torch.bfloat16


def test_fp64_views_into_fp32_encoders_name_the_view():
    model = OmniFuse([3, 2], 2, dim=4, hidden=5, num_blocks=1)
    views = [torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"views\[1\] is float64 while the encoders\[1\]'s"):
        model(views, torch.ones(4, 2, dtype=torch.bool))


def test_dwfuse_loss_refuses_mixed_logit_dtypes():
    """The dtype rule: modality and joint logits share one dtype, the terms come back in it."""
    loss = DWFuseLoss()
    z, o, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 5), torch.arange(4)
    with pytest.raises(TypeError, match=r"joint_logits is float32 but modality_logits is float64"):
        loss(z, o, y)
    terms = loss(z, o.double(), y)
    assert all(t.dtype == torch.float64 for t in terms)
    terms = loss(z.float(), o, y)
    assert all(t.dtype == torch.float32 for t in terms)


def test_float_labels_need_multilabel_true():
    z, o = torch.randn(4, 3, 5), torch.randn(4, 5)
    onehot = torch.nn.functional.one_hot(torch.arange(4), 5).float()
    with pytest.raises(ValueError, match=r"labels is a float tensor.*multilabel=False.*argmax"):
        DWFuseLoss()(z, o, onehot)
    with pytest.raises(ValueError, match=r"multilabel=True"):
        of.dwfuse_loss(z, onehot)
    with pytest.raises(ValueError, match=r"multilabel=True"):
        of.dwfuse_weights(z, onehot)
    # explicit: the same target as indices and as multilabel indicators are different losses
    indices = DWFuseLoss()(z, o, torch.arange(4)).loss
    multi = DWFuseLoss(multilabel=True)(z, o, onehot).loss
    assert not torch.allclose(indices, multi)
    with pytest.raises(ValueError, match=r"multilabel=True needs float 0/1 indicators"):
        DWFuseLoss(multilabel=True)(z, o, torch.arange(4))


def test_model_with_float_labels_needs_multilabel():
    model = OmniFuse([3, 2], 2, dim=4, hidden=5, num_blocks=1)
    views = [torch.randn(4, 3), torch.randn(4, 2)]
    labels = torch.nn.functional.one_hot(torch.arange(4) % 2, 2).float()
    with pytest.raises(ValueError, match=r"multilabel"):
        model(views, torch.ones(4, 2, dtype=torch.bool), labels)


def test_dwfuse_terms_backward_is_the_loss_backward():
    z = torch.randn(4, 3, 5, requires_grad=True)
    terms = DWFuseLoss()(z, torch.randn(4, 5), torch.arange(4))
    terms.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    loss, enc, ra = terms  # still a NamedTuple
    torch.testing.assert_close(loss, enc + 0.1 * ra)


def test_lazy_id_beyond_two_to_the_m_is_refused():
    miner = TLAMiner(3)
    with pytest.raises(
        ValueError,
        match=r"lazy must be a combination id of the 3 modalities, "
        r"in 1\.\.7",
    ):
        miner.lazy = 8
    miner.lazy = 5
    assert miner.lazy == 5
    miner.lazy = None
    assert miner.lazy is None
    miner.lazy_id.fill_(8)  # by hand, past the setter
    with pytest.raises(ValueError, match=r"lazy_id .* got 8"):
        miner.loss(torch.randn(4, 3), torch.arange(4) % 3, torch.ones(4, dtype=torch.long))
    state = TLAMiner(3).state_dict()
    state["lazy_id"] = torch.tensor(9)
    with pytest.raises(ValueError, match=r"lazy_id .* in 1\.\.7 .* got 9"):
        TLAMiner(3).load_state_dict(state)


def test_model_refuses_a_lazy_id_it_cannot_have():
    model = OmniFuse([3, 2, 2], 2, dim=4, hidden=5, num_blocks=1)
    model.miner.lazy_id.fill_(8)
    views = [torch.randn(4, d) for d in (3, 2, 2)]
    with pytest.raises(ValueError, match=r"lazy_id must be a combination id of the 3"):
        model(views, torch.ones(4, 3, dtype=torch.bool), torch.arange(4) % 2)


def test_npz_without_labels_names_the_cli_flag(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, view_a=np.zeros((3, 2)), view_b=np.ones((3, 1)), target=np.zeros(3))
    with pytest.raises(ValueError, match=r"store them as 'y'.*label=KEY.*--label KEY"):
        load_data(path)
    with pytest.raises(ValueError, match=r"no label array 'cls'.*--label KEY"):
        load_data(path, label="cls")


@pytest.mark.parametrize(
    "thunk,match",
    [
        (
            lambda: of.cra_forward(
                torch.randn(2, 6),
                torch.randn(1, 3, 6, dtype=torch.float64),
                torch.randn(1, 3),
                torch.randn(1, 6, 3),
                torch.randn(1, 6),
            ),
            r"w1 has dtype torch.float64 but x has torch.float32: .*w1\.to\(x\.dtype\)",
        ),
        (
            lambda: of.dwfuse_loss(torch.randn(4, 3, 5), torch.arange(4).int()),
            r"labels must be int64 class indices.*labels\.long\(\)",
        ),
        (
            lambda: of.dwfuse_loss(torch.randn(4, 3, 5), torch.full((4,), 5)),
            r"labels class indices must be in \[0, 4\].*C = 5 classes",
        ),
        (lambda: of.dwfuse_loss(torch.randn(4, 3, 5), torch.arange(4), beta=-1.0), r">= 0.0"),
        (
            lambda: of.tla_loss(torch.randn(4, 3), torch.arange(4) % 3, torch.zeros(4).long(), 1),
            r"comb combination ids .* combination_ids\(present\)",
        ),
        (
            lambda: of.combination_ids(torch.tensor([[True, False], [False, False]])),
            r"row 1\): every sample needs at least one",
        ),
    ],
)
def test_op_messages_say_what_to_do(thunk, match):
    with pytest.raises((TypeError, ValueError), match=match):
        thunk()
