"""Bad input raises a Python exception naming the argument (SPEC section 7), before any kernel.

Every case runs through the public op with ``backend="reference"``, so it also documents what a
fast backend will never see (validation is shared, in ``omnifuse_fast._checks``).
"""

from __future__ import annotations

import pytest
import torch

import omnifuse_fast as of
from omnifuse_fast import _checks

B, M, C, D, F, H, K = 4, 3, 5, 2, 6, 3, 2
META = torch.device("meta")  # a second device on any machine, to test device checks


def z3(b=B, m=M, c=C, dtype=torch.float32):
    return torch.randn(b, m, c, dtype=dtype)


def z2(b=B, c=C, dtype=torch.float32):
    return torch.randn(b, c, dtype=dtype)


def y(b=B, c=C):
    return torch.arange(b) % c


def comb(b=B, m=M):
    return (torch.arange(b) % ((1 << m) - 1)) + 1


def cra_args(**over):
    args = dict(
        x=torch.randn(B, F),
        w1=torch.randn(K, H, F),
        b1=torch.randn(K, H),
        w2=torch.randn(K, F, H),
        b2=torch.randn(K, F),
    )
    args.update(over)
    return args


def mix_args(**over):
    args = dict(
        v=torch.randn(B, M, D),
        labels=y(),
        src=torch.stack([torch.randperm(B) for _ in range(M)]),
        num_classes=C,
    )
    args.update(over)
    return args


def nan_at(t, idx=0):
    t = t.clone()
    t.view(-1)[idx] = float("nan")
    return t


def inf_at(t, idx=0):
    t = t.clone()
    t.view(-1)[idx] = float("inf")
    return t


def g(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype) for s in shapes]


# (id, thunk, exception type, regex that must appear in the message)
CASES = [
    # --- combination_ids -------------------------------------------------------------------
    (
        "present-rank",
        lambda: of.combination_ids(torch.ones(4, dtype=torch.bool)),
        ValueError,
        "present",
    ),
    ("present-dtype", lambda: of.combination_ids(torch.ones(4, 3)), TypeError, "present"),
    (
        "present-M1",
        lambda: of.combination_ids(torch.ones(4, 1, dtype=torch.bool)),
        ValueError,
        r"present.*2\.\.8",
    ),
    (
        "present-M9",
        lambda: of.combination_ids(torch.ones(4, 9, dtype=torch.bool)),
        ValueError,
        r"present.*2\.\.8",
    ),
    (
        "present-empty-row",
        lambda: of.combination_ids(torch.tensor([[True, False], [False, False]])),
        ValueError,
        r"present.*row 1",
    ),
    ("present-not-tensor", lambda: of.combination_ids([[True, False]]), TypeError, "present"),
    # --- cra_forward -----------------------------------------------------------------------
    (
        "cra-x-rank",
        lambda: of.cra_forward(**cra_args(x=torch.randn(B, 2, 3))),
        ValueError,
        "^x must",
    ),
    (
        "cra-x-int",
        lambda: of.cra_forward(**cra_args(x=torch.ones(B, F, dtype=torch.int64))),
        TypeError,
        "^x must",
    ),
    ("cra-w1-F", lambda: of.cra_forward(**cra_args(w1=torch.randn(K, H, F + 1))), ValueError, "w1"),
    ("cra-w1-rank", lambda: of.cra_forward(**cra_args(w1=torch.randn(H, F))), ValueError, "w1"),
    (
        "cra-w1-empty-K",
        lambda: of.cra_forward(**cra_args(w1=torch.randn(0, H, F))),
        ValueError,
        "w1",
    ),
    (
        "cra-b1-shape",
        lambda: of.cra_forward(**cra_args(b1=torch.randn(K, H + 1))),
        ValueError,
        "b1",
    ),
    ("cra-b1-K", lambda: of.cra_forward(**cra_args(b1=torch.randn(K + 1, H))), ValueError, "b1"),
    (
        "cra-w2-shape",
        lambda: of.cra_forward(**cra_args(w2=torch.randn(K, F, H + 1))),
        ValueError,
        "w2",
    ),
    ("cra-w2-F", lambda: of.cra_forward(**cra_args(w2=torch.randn(K, F - 1, H))), ValueError, "w2"),
    (
        "cra-b2-shape",
        lambda: of.cra_forward(**cra_args(b2=torch.randn(K, F + 1))),
        ValueError,
        "b2",
    ),
    (
        "cra-activation",
        lambda: of.cra_forward(**cra_args(), activation="sigmoid"),
        ValueError,
        "activation",
    ),
    (
        "cra-w1-dtype",
        lambda: of.cra_forward(**cra_args(w1=torch.randn(K, H, F).half())),
        TypeError,
        "w1",
    ),
    (
        "cra-b2-dtype",
        lambda: of.cra_forward(**cra_args(b2=torch.randn(K, F).double())),
        TypeError,
        "b2",
    ),
    (
        "cra-x-nan",
        lambda: of.cra_forward(**cra_args(x=nan_at(torch.randn(B, F)))),
        ValueError,
        "^x must be finite",
    ),
    (
        "cra-x-inf",
        lambda: of.cra_forward(**cra_args(x=inf_at(torch.randn(B, F)))),
        ValueError,
        "^x must be finite",
    ),
    (
        "cra-device",
        lambda: of.cra_forward(**cra_args(x=torch.randn(B, F, device=META))),
        ValueError,
        "w1.*meta|meta.*w1",
    ),
    ("cra-backend", lambda: of.cra_forward(**cra_args(), backend="gpu"), ValueError, "backend"),
    # --- dwfuse ----------------------------------------------------------------------------
    ("dw-logits-rank", lambda: of.dwfuse_weights(z2(), y()), ValueError, "modality_logits"),
    (
        "dw-logits-int",
        lambda: of.dwfuse_weights(torch.ones(B, M, C, dtype=torch.int64), y()),
        TypeError,
        "modality_logits",
    ),
    ("dw-M1", lambda: of.dwfuse_weights(z3(m=1), y()), ValueError, r"modality_logits.*M"),
    ("dw-M9", lambda: of.dwfuse_loss(z3(m=9), y()), ValueError, r"modality_logits.*M"),
    (
        "dw-C1",
        lambda: of.dwfuse_loss(z3(c=1), torch.zeros(B, dtype=torch.int64)),
        ValueError,
        "modality_logits.*C",
    ),
    (
        "dw-B0",
        lambda: of.dwfuse_loss(z3(b=0), torch.zeros(0, dtype=torch.int64)),
        ValueError,
        "modality_logits",
    ),
    ("dw-labels-B", lambda: of.dwfuse_loss(z3(), y(b=B + 1)), ValueError, "labels"),
    ("dw-labels-int32", lambda: of.dwfuse_loss(z3(), y().int()), TypeError, "labels"),
    ("dw-labels-float-1d", lambda: of.dwfuse_loss(z3(), y().float()), TypeError, "labels"),
    ("dw-labels-high", lambda: of.dwfuse_loss(z3(), torch.full((B,), C)), ValueError, "labels"),
    ("dw-labels-neg", lambda: of.dwfuse_weights(z3(), torch.full((B,), -1)), ValueError, "labels"),
    (
        "dw-labels-rank3",
        lambda: of.dwfuse_weights(z3(), torch.zeros(B, C, 1, dtype=torch.int64)),
        ValueError,
        "labels",
    ),
    ("dw-labels-not-tensor", lambda: of.dwfuse_weights(z3(), [0, 1, 2, 3]), TypeError, "labels"),
    (
        "dw-ml-labels-C",
        lambda: of.dwfuse_loss(z3(), torch.ones(B, C + 1), multilabel=True),
        ValueError,
        "labels",
    ),
    (
        "dw-ml-labels-B",
        lambda: of.dwfuse_loss(z3(), torch.ones(B - 1, C), multilabel=True),
        ValueError,
        "labels",
    ),
    (
        "dw-ml-labels-half-value",
        lambda: of.dwfuse_loss(z3(), torch.full((B, C), 0.5), multilabel=True),
        ValueError,
        "labels",
    ),
    (
        "dw-ml-labels-int",
        lambda: of.dwfuse_loss(z3(), torch.ones(B, C, dtype=torch.int64)),
        TypeError,
        "labels",
    ),
    ("dw-logits-nan", lambda: of.dwfuse_loss(nan_at(z3(), 7), y()), ValueError, "modality_logits"),
    (
        "dw-logits-inf",
        lambda: of.dwfuse_weights(inf_at(z3(), 3), y()),
        ValueError,
        "modality_logits",
    ),
    ("dw-beta-neg", lambda: of.dwfuse_loss(z3(), y(), beta=-0.1), ValueError, "beta"),
    ("dw-beta-nan", lambda: of.dwfuse_weights(z3(), y(), beta=float("nan")), ValueError, "beta"),
    ("dw-beta-str", lambda: of.dwfuse_weights(z3(), y(), beta="0.5"), TypeError, "beta"),
    ("dw-detach", lambda: of.dwfuse_loss(z3(), y(), detach_weight=1), TypeError, "detach_weight"),
    ("dw-device", lambda: of.dwfuse_loss(z3().to(META), y()), ValueError, "labels"),
    ("dw-labels-device", lambda: of.dwfuse_loss(z3(), y().to(META)), ValueError, "labels.*meta"),
    (
        "dw-ml-labels-device",
        lambda: of.dwfuse_weights(z3(), torch.ones(B, C, device=META), multilabel=True),
        ValueError,
        "labels.*meta",
    ),
    ("dw-backend", lambda: of.dwfuse_loss(z3(), y(), backend="fast"), ValueError, "backend"),
    # --- tla -------------------------------------------------------------------------------
    ("tla-logits-rank", lambda: of.tla_stats(z3(), y(), comb(), M), ValueError, "logits"),
    (
        "tla-logits-C1",
        lambda: of.tla_loss(z2(c=1), torch.zeros(B, dtype=torch.int64), comb(), 1),
        ValueError,
        "logits",
    ),
    ("tla-labels-B", lambda: of.tla_stats(z2(), y(b=B - 1), comb(), M), ValueError, "labels"),
    (
        "tla-labels-high",
        lambda: of.tla_loss(z2(), torch.full((B,), C), comb(), 1),
        ValueError,
        "labels",
    ),
    ("tla-labels-float", lambda: of.tla_loss(z2(), y().float(), comb(), 1), TypeError, "labels"),
    ("tla-comb-B", lambda: of.tla_stats(z2(), y(), comb(b=B + 1), M), ValueError, "comb"),
    (
        "tla-comb-zero",
        lambda: of.tla_stats(z2(), y(), torch.zeros(B, dtype=torch.int64), M),
        ValueError,
        "comb",
    ),
    (
        "tla-comb-too-big",
        lambda: of.tla_stats(z2(), y(), torch.full((B,), 1 << M), M),
        ValueError,
        "comb",
    ),
    (
        "tla-comb-too-big-loss",
        lambda: of.tla_loss(z2(), y(), torch.full((B,), 256), 1),
        ValueError,
        "comb",
    ),
    ("tla-comb-float", lambda: of.tla_loss(z2(), y(), comb().float(), 1), TypeError, "comb"),
    ("tla-comb-rank", lambda: of.tla_loss(z2(), y(), comb().view(B, 1), 1), ValueError, "comb"),
    ("tla-M1", lambda: of.tla_stats(z2(), y(), comb(m=1), 1), ValueError, "num_modalities"),
    ("tla-M9", lambda: of.tla_stats(z2(), y(), comb(), 9), ValueError, "num_modalities"),
    ("tla-M-float", lambda: of.tla_stats(z2(), y(), comb(), 3.0), TypeError, "num_modalities"),
    (
        "tla-distance",
        lambda: of.tla_stats(z2(), y(), comb(), M, distance="kl"),
        ValueError,
        "distance",
    ),
    ("tla-logits-nan", lambda: of.tla_stats(nan_at(z2()), y(), comb(), M), ValueError, "logits"),
    (
        "tla-loss-logits-inf",
        lambda: of.tla_loss(inf_at(z2()), y(), comb(), 1),
        ValueError,
        "logits",
    ),
    ("tla-lazy-zero", lambda: of.tla_loss(z2(), y(), comb(), 0), ValueError, "lazy"),
    ("tla-lazy-256", lambda: of.tla_loss(z2(), y(), comb(), 256), ValueError, "lazy"),
    ("tla-lazy-float", lambda: of.tla_loss(z2(), y(), comb(), 1.0), TypeError, "lazy"),
    ("tla-lazy-bool", lambda: of.tla_loss(z2(), y(), comb(), True), TypeError, "lazy"),
    (
        "tla-device",
        lambda: of.tla_loss(z2().to(META), y(), comb(), 1),
        ValueError,
        "labels.*meta|meta.*labels",
    ),
    ("tla-stats-device", lambda: of.tla_stats(z2().to(META), y(), comb(), M), ValueError, "labels"),
    (
        "tla-labels-device",
        lambda: of.tla_loss(z2(), y().to(META), comb(), 1),
        ValueError,
        "labels.*meta",
    ),
    (
        "tla-comb-device",
        lambda: of.tla_stats(z2(), y(), comb().to(META), M),
        ValueError,
        "comb.*meta",
    ),
    (
        "tla-backend",
        lambda: of.tla_loss(z2(), y(), comb(), 1, backend="Reference"),
        ValueError,
        "backend",
    ),
    # --- modality_mix ----------------------------------------------------------------------
    (
        "mix-v-rank",
        lambda: of.modality_mix(**mix_args(v=torch.randn(B, M * D))),
        ValueError,
        "^v must",
    ),
    (
        "mix-v-int",
        lambda: of.modality_mix(**mix_args(v=torch.ones(B, M, D, dtype=torch.int64))),
        TypeError,
        "^v must",
    ),
    (
        "mix-M1",
        lambda: of.modality_mix(
            **mix_args(v=torch.randn(B, 1, D), src=torch.zeros(1, B, dtype=torch.int64))
        ),
        ValueError,
        r"v\.shape\[1\]",
    ),
    (
        "mix-M9",
        lambda: of.modality_mix(
            **mix_args(v=torch.randn(B, 9, D), src=torch.zeros(9, B, dtype=torch.int64))
        ),
        ValueError,
        r"v\.shape\[1\]",
    ),
    ("mix-labels-B", lambda: of.modality_mix(**mix_args(labels=y(b=B + 1))), ValueError, "labels"),
    (
        "mix-labels-high",
        lambda: of.modality_mix(**mix_args(labels=torch.full((B,), C))),
        ValueError,
        "labels",
    ),
    (
        "mix-labels-int32",
        lambda: of.modality_mix(**mix_args(labels=y().int())),
        TypeError,
        "labels",
    ),
    (
        "mix-num-classes-1",
        lambda: of.modality_mix(
            **mix_args(num_classes=1, labels=torch.zeros(B, dtype=torch.int64))
        ),
        ValueError,
        "num_classes",
    ),
    (
        "mix-num-classes-float",
        lambda: of.modality_mix(**mix_args(num_classes=5.0)),
        TypeError,
        "num_classes",
    ),
    (
        "mix-src-transposed",
        lambda: of.modality_mix(**mix_args(src=torch.zeros(B, M, dtype=torch.int64))),
        ValueError,
        "src",
    ),
    (
        "mix-src-B",
        lambda: of.modality_mix(**mix_args(src=torch.zeros(M, B + 1, dtype=torch.int64))),
        ValueError,
        "src",
    ),
    (
        "mix-src-rank",
        lambda: of.modality_mix(**mix_args(src=torch.zeros(M * B, dtype=torch.int64))),
        ValueError,
        "src",
    ),
    ("mix-src-float", lambda: of.modality_mix(**mix_args(src=torch.zeros(M, B))), TypeError, "src"),
    (
        "mix-src-high",
        lambda: of.modality_mix(**mix_args(src=torch.full((M, B), B))),
        ValueError,
        "src",
    ),
    (
        "mix-src-neg",
        lambda: of.modality_mix(**mix_args(src=torch.full((M, B), -1))),
        ValueError,
        "src",
    ),
    (
        "mix-weights-neg",
        lambda: of.modality_mix(**mix_args(weights=torch.tensor([1.5, -0.25, -0.25]))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-sum",
        lambda: of.modality_mix(**mix_args(weights=torch.full((M,), 0.5))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-row-sum",
        lambda: of.modality_mix(
            **mix_args(weights=torch.cat([torch.full((B - 1, M), 1 / M), torch.zeros(1, M)]))
        ),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-nan",
        lambda: of.modality_mix(**mix_args(weights=torch.tensor([float("nan"), 0.5, 0.5]))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-M",
        lambda: of.modality_mix(**mix_args(weights=torch.full((M + 1,), 1 / (M + 1)))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-BM",
        lambda: of.modality_mix(**mix_args(weights=torch.full((B + 1, M), 1 / M))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-rank3",
        lambda: of.modality_mix(**mix_args(weights=torch.full((1, B, M), 1 / M))),
        ValueError,
        "weights",
    ),
    (
        "mix-weights-int",
        lambda: of.modality_mix(**mix_args(weights=torch.tensor([1, 0, 0]))),
        TypeError,
        "weights",
    ),
    (
        "mix-device",
        lambda: of.modality_mix(**mix_args(v=torch.randn(B, M, D, device=META))),
        ValueError,
        "labels",
    ),
    (
        "mix-weights-device",
        lambda: of.modality_mix(**mix_args(weights=torch.full((M,), 1 / M, device=META))),
        ValueError,
        "weights",
    ),
    (
        "mix-src-device",
        lambda: of.modality_mix(**mix_args(src=torch.zeros(M, B, dtype=torch.int64, device=META))),
        ValueError,
        "src.*meta",
    ),
    (
        "mix-labels-device",
        lambda: of.modality_mix(**mix_args(labels=y().to(META))),
        ValueError,
        "labels.*meta",
    ),
    (
        "mix-weights-list",
        lambda: of.modality_mix(**mix_args(weights=[0.5, 0.25, 0.25])),
        TypeError,
        "weights",
    ),
    ("mix-backend", lambda: of.modality_mix(**mix_args(), backend=""), ValueError, "backend"),
    # --- soft_cross_entropy ----------------------------------------------------------------
    (
        "sce-logits-rank",
        lambda: of.soft_cross_entropy(z3(), torch.rand(B, M, C)),
        ValueError,
        "logits",
    ),
    ("sce-C1", lambda: of.soft_cross_entropy(z2(c=1), torch.ones(B, 1)), ValueError, "logits"),
    (
        "sce-soft-B",
        lambda: of.soft_cross_entropy(z2(), torch.rand(B + 1, C)),
        ValueError,
        "soft_labels",
    ),
    (
        "sce-soft-C",
        lambda: of.soft_cross_entropy(z2(), torch.rand(B, C + 1)),
        ValueError,
        "soft_labels",
    ),
    (
        "sce-soft-int",
        lambda: of.soft_cross_entropy(z2(), torch.ones(B, C, dtype=torch.int64)),
        TypeError,
        "soft_labels",
    ),
    (
        "sce-mixed-dtype",
        lambda: of.soft_cross_entropy(z2(), torch.rand(B, C).double()),
        TypeError,
        "soft_labels",
    ),
    (
        "sce-mixed-half",
        lambda: of.soft_cross_entropy(z2(dtype=torch.float16), torch.rand(B, C)),
        TypeError,
        "soft_labels",
    ),
    (
        "sce-nan",
        lambda: of.soft_cross_entropy(nan_at(z2()), torch.rand(B, C)),
        ValueError,
        "logits",
    ),
    (
        "sce-device",
        lambda: of.soft_cross_entropy(z2().to(META), torch.rand(B, C)),
        ValueError,
        "soft_labels",
    ),
    (
        "sce-backend",
        lambda: of.soft_cross_entropy(z2(), torch.rand(B, C), backend=None),
        ValueError,
        "backend",
    ),
    # --- mimo / mgda -----------------------------------------------------------------------
    ("mimo-not-list", lambda: of.mimo_combine(torch.randn(3), [torch.randn(3)]), TypeError, "g0"),
    (
        "mimo-not-tensors",
        lambda: of.mimo_combine([torch.randn(3)], [[1.0, 2.0, 3.0]]),
        TypeError,
        "gw",
    ),
    ("mimo-empty", lambda: of.mimo_combine([], []), ValueError, "g0"),
    ("mimo-length", lambda: of.mimo_combine(g((3,), (2,)), g((3,))), ValueError, "g0.*gw"),
    (
        "mimo-shape",
        lambda: of.mimo_combine(g((3,), (2,)), g((3,), (3,))),
        ValueError,
        r"g0\[1\].*gw\[1\]",
    ),
    (
        "mimo-dtype",
        lambda: of.mimo_combine(g((3,)), g((3,), dtype=torch.float64)),
        ValueError,
        r"g0\[0\].*gw\[0\]",
    ),
    (
        "mimo-int",
        lambda: of.mimo_combine(
            [torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]
        ),
        TypeError,
        r"g0\[0\]",
    ),
    (
        "mimo-device",
        lambda: of.mimo_combine([torch.randn(3, device=META)], g((3,))),
        ValueError,
        r"gw\[0\]",
    ),
    (
        "mimo-device-2nd",
        lambda: of.mimo_combine(g((3,), (2,)), [torch.randn(3), torch.randn(2, device=META)]),
        ValueError,
        r"gw\[1\]",
    ),
    (
        "mimo-backend",
        lambda: of.mimo_combine(g((3,)), g((3,)), backend="cuda-fast"),
        ValueError,
        "backend",
    ),
    ("mgda-not-list", lambda: of.mgda_min_norm(torch.randn(2, 3)), TypeError, "grads"),
    ("mgda-empty", lambda: of.mgda_min_norm([]), TypeError, "grads"),
    ("mgda-shape", lambda: of.mgda_min_norm([g((3,)), g((4,))]), ValueError, r"grads\[1\]"),
    ("mgda-length", lambda: of.mgda_min_norm([g((3,), (2,)), g((3,))]), ValueError, r"grads\[1\]"),
    (
        "mgda-backend",
        lambda: of.mgda_min_norm([g((3,)), g((3,))], backend="x"),
        ValueError,
        "backend",
    ),
]


@pytest.mark.parametrize("thunk,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_good_inputs_of_the_same_builders_pass():
    """The builders above are valid when left alone: each case fails for its one defect."""
    of.combination_ids(torch.ones(B, M, dtype=torch.bool), backend="reference")
    of.cra_forward(**cra_args(), backend="reference")
    of.dwfuse_loss(z3(), y(), backend="reference")
    of.dwfuse_loss(z3(), torch.ones(B, C), backend="reference", multilabel=True)
    of.tla_stats(z2(), y(), comb(), M, backend="reference")
    of.tla_loss(z2(), y(), comb(), 1, backend="reference")
    of.modality_mix(**mix_args(), weights=torch.full((B, M), 1 / M), backend="reference")
    of.soft_cross_entropy(z2(), torch.rand(B, C), backend="reference")
    of.mimo_combine(g((3,), (2,)), g((3,), (2,)), backend="reference")
    of.mgda_min_norm([g((3,), (2,)), g((3,), (2,))], backend="reference")


def test_unavailable_backend_is_a_runtime_error_with_the_reason():
    with pytest.raises(RuntimeError, match=r"'cuda' is not available for dwfuse_loss.*: \w+"):
        of.dwfuse_loss(z3(), y(), backend="cuda")
    with pytest.raises(RuntimeError, match=r"'triton' is not available.*(CUDA|Triton)"):
        of.tla_loss(z2(), y(), comb(), 1, backend="triton")


@pytest.mark.parametrize(
    "over,x_width,w1_width",
    [(dict(x=torch.randn(B, F + 1)), F + 1, F), (dict(w1=torch.randn(K, H, F + 1)), F, F + 1)],
    ids=["x-odd", "w1-odd"],
)
def test_cra_width_mismatch_names_x_and_w1_and_the_rule(over, x_width, w1_width):
    """Either side may be the odd one out: the message names both widths and the rule."""
    with pytest.raises(ValueError) as err:
        of.cra_forward(**cra_args(**over), backend="reference")
    msg = str(err.value)
    assert msg.startswith("x and w1 disagree"), msg
    assert f"F = M*D = {x_width}" in msg and f"w1's last dim is {w1_width}" in msg
    assert "F must equal w1's last dim" in msg


def test_non_finite_inputs_raise_non_finite_input_error():
    """One exception type for NaN/inf input (a ValueError), that callers can catch by type."""
    assert issubclass(_checks.NonFiniteInputError, ValueError)
    with pytest.raises(_checks.NonFiniteInputError, match="x must be finite"):
        of.cra_forward(**cra_args(x=nan_at(torch.randn(B, F))), backend="reference")
    with pytest.raises(_checks.NonFiniteInputError, match=r"g0\[0\] must be finite"):
        _checks.finite_list("g0", [torch.tensor([float("inf")])])
    with pytest.raises(_checks.NonFiniteInputError, match="alpha must be finite"):
        _checks.real("alpha", float("nan"))


# --- value checks switched off ----------------------------------------------------------------


def test_value_checks_off_skips_value_checks():
    of.set_value_checks(False)
    assert not of.value_checks_enabled()
    # the checks themselves no longer read the data
    _checks.class_labels("labels", torch.full((B,), C + 10), B, C)
    _checks.in_range("src", torch.full((M, B), -5), 0, B - 1)
    _checks.finite("logits", torch.full((2,), float("nan")))
    _checks.comb_ids("comb", torch.zeros(B, dtype=torch.int64), B, M)
    _checks.present_mask("present", torch.zeros(B, M, dtype=torch.bool))
    # and the ops run: non-finite logits propagate instead of raising
    out = of.dwfuse_weights(nan_at(z3()), y(), backend="reference")
    assert torch.isnan(out).any()
    # a comb outside 1..2^M-1 is not looked at: the loss just finds no matching sample
    loss = of.tla_loss(z2(), y(), torch.zeros(B, dtype=torch.int64), 1, backend="reference")
    assert loss.item() == 0.0
    of.combination_ids(torch.zeros(B, M, dtype=torch.bool), backend="reference")
    of.set_value_checks(True)
    assert of.value_checks_enabled()
    with pytest.raises(ValueError, match="labels"):
        _checks.class_labels("labels", torch.full((B,), C + 10), B, C)


_SHAPE_CASES = [c for c in CASES if c[2] is TypeError or "device" in c[0] or "rank" in c[0]]
_SHAPE_CASES += [
    c
    for c in CASES
    if c[0]
    in {
        "dw-M9",
        "dw-labels-B",
        "dw-ml-labels-C",
        "cra-w1-F",
        "cra-b2-shape",
        "tla-comb-B",
        "tla-M9",
        "tla-distance",
        "mix-src-transposed",
        "mix-weights-M",
        "mix-weights-BM",
        "sce-soft-C",
        "mimo-shape",
        "mgda-length",
        "cra-activation",
        "present-M9",
    }
]


@pytest.mark.parametrize(
    "thunk,exc,match", [c[1:] for c in _SHAPE_CASES], ids=[c[0] for c in _SHAPE_CASES]
)
def test_shape_dtype_device_checks_run_with_value_checks_off(thunk, exc, match):
    of.set_value_checks(False)
    with pytest.raises(exc, match=match):
        thunk()


def test_device_checked_before_reading_a_second_device_with_checks_off():
    """Labels on another device: with value checks off nothing reads them, and the device check
    (always on) names them."""
    of.set_value_checks(False)
    with pytest.raises(ValueError, match="labels.*meta"):
        of.dwfuse_loss(z3(), y().to(META))
    with pytest.raises(ValueError, match="comb.*meta"):
        of.tla_loss(z2(), y(), comb().to(META), 1)
    with pytest.raises(ValueError, match="src.*meta"):
        of.modality_mix(**mix_args(src=torch.zeros(M, B, dtype=torch.int64, device=META)))


def test_non_finite_soft_labels_and_gradients_are_rejected():
    logits = torch.randn(3, 4)
    soft = torch.full((3, 4), 0.25)
    soft[1, 2] = float("nan")
    with pytest.raises(ValueError, match="soft_labels"):
        of.soft_cross_entropy(logits, soft)
    g0 = [torch.randn(3), torch.randn(2, 2)]
    gw = [torch.randn(3), torch.full((2, 2), float("inf"))]
    with pytest.raises(ValueError, match=r"gw\[1\]"):
        of.mimo_combine(g0, gw)
    with pytest.raises(ValueError, match=r"grads\[1\]\[1\]"):
        of.mgda_min_norm([g0, gw])
