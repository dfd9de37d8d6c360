"""Tiny sample arguments for ``torch.library.opcheck`` of every custom op: the compiled ones
(``torch.ops.omnifuse_fast``, csrc/ops.cpp; CPU or CUDA tensors) and the Triton ones
(``torch.ops.omnifuse_fast_triton``; CPU tensors run in the interpreter)."""

from __future__ import annotations

import torch

Sample = tuple[str, tuple]
B, M, C, D = 5, 3, 4, 6


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, grad=False, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=dtype).requires_grad_(grad)


def _common():
    """Inputs shared by both namespaces (CPU tensors)."""
    y = torch.randint(0, C, (B,), generator=_g(1))
    return dict(
        y=y,
        yml=(torch.rand(B, C, generator=_g(2)) > 0.5).float(),
        comb=torch.tensor([1, 3, 7, 3, 2]),
        src=torch.randint(0, B, (M, B), generator=_g(3)),
        present=torch.rand(B, M, generator=_g(7)) > 0.3,
        one=torch.tensor(1.3),
        z3=_randn(B, M, C),
        z2=_randn(B, C),
        q=torch.softmax(_randn(B, C, seed=6), -1),
    )


def _cra(feat: int, k: int = 2, h: int = 3) -> list[torch.Tensor]:
    x = _randn(B, feat, grad=True)
    return [x, _randn(k, h, feat, grad=True), _randn(k, h, grad=True)] + [
        _randn(k, feat, h, grad=True),
        _randn(k, feat, grad=True),
    ]


def compiled_samples() -> list[Sample]:
    """(op name, args): every op of csrc/ops.cpp, forward ops with inputs that require grad."""
    t = _common()
    y, yml, z3, z2, one = t["y"], t["yml"], t["z3"], t["z2"], t["one"]
    cra = _cra(7)
    k, h = cra[1].shape[:2]
    # the CPU CRA's stash pair: forward keeps s_k, c_k and the pre-activations for the backward
    cra_w = [cra[1].detach(), cra[3].detach()]
    stash = [_randn(k, B, 7, seed=8), _randn(k, B, h, seed=9), _randn(k, B, h, seed=10)]
    mask, all5 = [True, False, True, True, False], [True] * 5
    g0 = [_randn(3, 2, grad=True), _randn(5, grad=True, dtype=torch.float64)]
    gw = [_randn(3, 2, grad=True, seed=4), _randn(5, grad=True, dtype=torch.float64, seed=5)]
    return [
        ("combination_ids", (t["present"],)),
        ("cra_forward", (*cra, "gelu")),
        ("cra_backward", (_randn(B, 7), _randn(B, k * h), *[a.detach() for a in cra], "silu")),
        ("cra_forward_stash", (*cra, "gelu")),
        ("cra_forward_stash", (*cra, "relu")),
        ("cra_backward_stash", (_randn(B, 7), _randn(B, k * h), *cra_w, *stash, "silu", mask)),
        (
            "cra_backward_stash",
            (_randn(B, 7), _randn(B, k * h), *cra_w, *stash[:2], torch.empty(0), "tanh", all5),
        ),
        ("dwfuse_weights", (_randn(B, M, C, grad=True), y, 0.5)),
        ("dwfuse_weights", (_randn(B, M, C, grad=True), yml, 0.5)),
        ("dwfuse_weights_backward", (_randn(B, M), z3, y, 0.5)),
        ("dwfuse_weights_backward", (_randn(B, M, C), z3, yml, 0.5)),
        ("dwfuse_loss", (_randn(B, M, C, grad=True), y, 0.5, False)),
        ("dwfuse_loss", (_randn(B, M, C, grad=True), yml, 0.5, True)),
        ("dwfuse_loss_backward", (one, z3, y, 0.5, False)),
        ("dwfuse_loss_backward", (one, z3, yml, 0.5, True)),
        ("tla_stats", (z2, y, t["comb"], 3, "l2")),
        ("tla_loss", (_randn(B, C, grad=True), y, t["comb"], 3)),
        ("tla_loss_backward", (one, z2, y, t["comb"], 3)),
        ("modality_mix", (_randn(B, M, D, grad=True), y, t["src"], C, None)),
        ("modality_mix", (_randn(B, M, D, grad=True), y, t["src"], C, torch.full((B, M), 1 / M))),
        ("modality_mix_backward", (_randn(B, M, D), t["src"], B)),
        ("soft_cross_entropy", (_randn(B, C, grad=True), t["q"].clone().requires_grad_(True))),
        ("soft_cross_entropy_backward", (one, z2, t["q"])),
        ("soft_cross_entropy", (_randn(B, C, grad=True), t["q"].clone())),  # d logits only
        ("soft_cross_entropy_backward_logits", (one, z2, t["q"])),
        ("soft_cross_entropy_grad", (_randn(B, C, grad=True), t["q"].clone())),
        ("mimo_gram", (g0, gw)),
        ("mimo_direction", (g0, gw, torch.tensor(0.25))),
    ]


def detached(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach() for t in tensors]


def _schema_args(namespace: str, name: str) -> list[str]:
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    return [a.name for a in schema.arguments]


def triton_samples() -> list[Sample]:
    """(op name, args): every Triton custom op (omnifuse_fast/triton), tiny CPU tensors."""
    t = _common()
    y, yml, z3, z2, one, src = t["y"], t["yml"], t["z3"], t["z2"], t["one"], t["src"]
    cra = _cra(16, h=16)
    g0 = [_randn(3, 2, grad=True), _randn(5, grad=True, seed=1)]
    gw = [_randn(3, 2, grad=True, seed=4), _randn(5, grad=True, seed=5)]
    lam = torch.tensor(0.25)
    mix_back = (_randn(B, M, D), src)
    w1, w2 = cra[1].detach(), cra[3].detach()
    k, h = w1.shape[:2]
    stash = (_randn(k, B, 16, seed=8), _randn(k, B, h, seed=9))  # the forward's s and a, fp32
    return [
        ("combination_ids", (t["present"],)),
        ("cra_forward", (*cra, "gelu", True)),
        ("cra_forward", (*[a.detach() for a in cra], "relu", False)),
        ("cra_backward", (_randn(B, 16), _randn(B, k * h), w1, w2, *stash, "silu")),
        ("dwfuse_weights", (_randn(B, M, C, grad=True), y, 0.5)),
        ("dwfuse_weights", (_randn(B, M, C, grad=True), yml, 0.5)),
        ("dwfuse_weights_backward", (_randn(B, M), z3, y, 0.5)),
        ("dwfuse_loss", (_randn(B, M, C, grad=True), y, 0.5, False)),
        ("dwfuse_loss", (_randn(B, M, C, grad=True), yml, 0.5, True)),
        ("dwfuse_loss_backward", (one, z3, y, 0.5, False)),
        ("tla_stats", (z2, y, t["comb"], 3, "l2")),
        ("tla_loss", (_randn(B, C, grad=True), y, t["comb"], 3)),
        ("tla_loss_backward", (one, z2, y, t["comb"], 3)),
        ("modality_mix", (_randn(B, M, D, grad=True), y, src, C, None)),
        ("modality_mix", (_randn(B, M, D, grad=True), y, src, C, torch.full((B, M), 1 / M))),
        ("modality_mix_backward", mix_back),
        ("modality_mix_weights_backward", (_randn(B, C), y, src)),
        ("soft_cross_entropy", (_randn(B, C, grad=True), t["q"].clone().requires_grad_(True))),
        ("soft_cross_entropy_backward", (one, z2, t["q"], True)),
        ("mimo_combine", (g0, gw)),
        (
            "mimo_combine_backward",
            ([_randn(3, 2), _randn(5)], one, detached(g0), detached(gw), lam),
        ),
        ("mgda_min_norm", (detached(g0 + gw), 2)),
    ]


def triton_args(name: str, args: tuple) -> tuple:
    """``args`` fitted to the op's schema where it takes an extra mode string (mix backward)."""
    if name == "modality_mix_backward" and "mode" in _schema_args("omnifuse_fast_triton", name):
        return (*args, "deterministic")
    return args


def schemas(namespace: str) -> set[str]:
    """Names of the ops registered under ``namespace`` in this process."""
    prefix = namespace + "::"
    return {
        s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith(prefix)
    }


def on(device: str, args):
    """``args`` with every tensor (also in lists) moved to ``device``, requires_grad kept."""
    if isinstance(args, (list, tuple)):
        return type(args)(on(device, a) for a in args)
    if isinstance(args, torch.Tensor):
        return args.detach().to(device).requires_grad_(args.requires_grad)
    return args
