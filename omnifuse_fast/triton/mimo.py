"""MIMO (SPEC section 6) in Triton: multi-tensor Gram and combine over lists of gradients.

The gradients stay where they are (no concatenation). A host-built *chunk table* lists, for
every chunk of at most ``CHUNK`` elements of every tensor, the raw addresses of that tensor in
each input (and output) list plus the chunk's range; one program per row. So each pass is
one launch per dtype present in the lists (usually one), whatever the number of tensors:
the Gram pass writes fp32 partial Gram matrices per chunk, reduced on the device in fp64; the
combine pass writes every output tensor.

Because the kernels reach the tensors through addresses in a table, these ops are opaque
``torch.library.custom_op``s with fake implementations, not ``triton_op``s: functionalization
(what ``triton_op`` relies on to trace the kernels) cannot see tensors behind raw addresses.
``torch.compile(fullgraph=True)`` still traces them, as single graph nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast.reference import mimo as _reference
from omnifuse_fast.reference.mimo import frank_wolfe_min_norm, min_norm_lambda
from omnifuse_fast.triton._common import jit, launch, next_pow2, use_reference

_CHUNK = 16384  # elements of one tensor handled by one program (at most)
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@jit
def _multi_dot_kernel(
    table_ptr,
    out_ptr,
    NT: tl.constexpr,
    NTP: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Row j of the table: NT addresses, start, end. Writes the chunk's NT x NT Gram (fp32)."""
    j = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, NTP)
    row = table_ptr + j * (NT + 2)
    ptrs = tl.load(row + t, mask=t < NT, other=0).to(tl.pointer_type(DT))
    start = tl.load(row + NT)
    end = tl.load(row + NT + 1)
    o = tl.arange(0, BLOCK)
    acc = tl.zeros([NTP, NTP, BLOCK], tl.float32)
    for k0 in range(0, CHUNK, BLOCK):
        idx = start + k0 + o
        ok = (t < NT)[:, None] & (idx < end)[None, :]
        x = tl.load(ptrs[:, None] + idx[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += x[:, None, :] * x[None, :, :]
    gram = tl.sum(acc, axis=2)
    tl.store(out_ptr + j * NTP * NTP + t[:, None] * NTP + t[None, :], gram)


@jit
def _multi_lincomb_kernel(
    table_ptr,
    coef_ptr,
    NT: tl.constexpr,
    NO: tl.constexpr,
    NTP: tl.constexpr,
    NOP: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Row j: NT input addresses, NO output addresses, start, end.
    ``out_o = sum_t coef[o, t] * in_t`` in the coefficients' dtype (fp32 or fp64)."""
    j = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, NTP)
    o = tl.arange(0, NOP)
    row = table_ptr + j * (NT + NO + 2)
    src = tl.load(row + t, mask=t < NT, other=0).to(tl.pointer_type(DT))
    dst = tl.load(row + NT + o, mask=o < NO, other=0).to(tl.pointer_type(DT))
    start = tl.load(row + NT + NO)
    end = tl.load(row + NT + NO + 1)
    cmask = (o < NO)[:, None] & (t < NT)[None, :]
    coef = tl.load(coef_ptr + o[:, None] * NT + t[None, :], mask=cmask, other=0.0)  # [NOP, NTP]
    e = tl.arange(0, BLOCK)
    for k0 in range(0, CHUNK, BLOCK):
        idx = start + k0 + e
        ok = (t < NT)[:, None] & (idx < end)[None, :]
        x = tl.load(src[:, None] + idx[None, :], mask=ok, other=0.0)  # 0: padding rows add 0
        # bf16 <-> fp64 through fp32 (exact on the way in): the interpreter converts them wrongly
        y = tl.sum(coef[:, :, None] * x.to(tl.float32).to(coef.dtype)[None, :, :], axis=1)
        if DT != tl.float64:
            y = y.to(tl.float32)
        tl.store(
            dst[:, None] + idx[None, :], y.to(DT), mask=(o < NO)[:, None] & (idx < end)[None, :]
        )


def _tables(lists: Sequence[Sequence[torch.Tensor]], chunk: int, device: torch.device):
    """Per dtype of ``lists[0]``: ``(tl dtype, rows)``, rows ``[addresses..., start, end]`` on
    ``device``: built on the host, copied without a sync (pinned, non-blocking)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            groups.setdefault(t.dtype, []).append(i)
    for dtype, idx in groups.items():
        rows = []
        for i in idx:
            ptrs = [lst[i].data_ptr() for lst in lists]
            n = lists[0][i].numel()
            rows += [[*ptrs, s, n] for s in range(0, n, chunk)]
        table = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)
        yield _TL_DTYPES[dtype], table


def _chunk(lists: Sequence[Sequence[torch.Tensor]], block: int) -> int:
    # a power of two >= BLOCK: few specializations, short loops for small tensors
    biggest = max((t.numel() for t in lists[0]), default=1)
    return max(block, min(_CHUNK, next_pow2(biggest)))


def gram(lists: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``G[s, t] = sum_i <lists[s][i], lists[t][i]>`` as fp64 ``[T, T]`` (fp32 partials)."""
    nt = len(lists)
    ntp = next_pow2(nt)
    device = lists[0][0].device
    block = max(16, min(1024, 8192 // (ntp * ntp)))
    chunk = _chunk(lists, block)
    total = torch.zeros(ntp, ntp, dtype=torch.float64, device=device)
    for dt, table in _tables(lists, chunk, device):
        partial = torch.empty(len(table), ntp, ntp, dtype=torch.float32, device=device)
        launch(
            _multi_dot_kernel,
            (len(table),),
            table,
            partial,
            NT=nt,
            NTP=ntp,
            DT=dt,
            BLOCK=block,
            CHUNK=chunk,
        )
        total += partial.double().sum(dim=0)
    return total[:nt, :nt]


def lincomb(
    lists: Sequence[Sequence[torch.Tensor]], coef: torch.Tensor
) -> list[list[torch.Tensor]]:
    """``out[o][i] = sum_t coef[o, t] * lists[t][i]`` (computed in ``coef.dtype``), per tensor."""
    nt, no = len(lists), coef.shape[0]
    ntp, nop = next_pow2(nt), next_pow2(no)
    outs = [[torch.empty_like(t) for t in lists[0]] for _ in range(no)]
    block = max(16, min(1024, 8192 // (ntp * nop)))
    chunk = _chunk(lists, block)
    coef = coef.contiguous()
    for dt, table in _tables([*lists, *outs], chunk, coef.device):
        launch(
            _multi_lincomb_kernel,
            (len(table),),
            table,
            coef,
            NT=nt,
            NO=no,
            NTP=ntp,
            NOP=nop,
            DT=dt,
            BLOCK=block,
            CHUNK=chunk,
        )
    return outs


def _contiguous(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


# ---------------------------------------------------------------------------- the ops


@torch.library.custom_op("omnifuse_fast_triton::mimo_combine", mutates_args=())
def _combine_op(
    g0: list[torch.Tensor], gw: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    g0, gw = _contiguous(g0), _contiguous(gw)
    g = gram([g0, gw])
    g = _device_checks.check_gram("mimo_combine", g, [g0, gw])
    lam = min_norm_lambda(g[0, 0], g[0, 1], g[1, 1])  # fp32, on the device
    (direction,) = lincomb([g0, gw], torch.stack([lam, 1.0 - lam]).view(1, 2))
    return direction, lam


@_combine_op.register_fake
def _combine_fake(g0, gw):
    return [torch.empty_like(t) for t in g0], g0[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("omnifuse_fast_triton::mimo_combine_backward", mutates_args=())
def _combine_backward_op(
    grad_dir: list[torch.Tensor],
    grad_lam: torch.Tensor,
    g0: list[torch.Tensor],
    gw: list[torch.Tensor],
    lam: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    grad_dir, g0, gw = _contiguous(grad_dir), _contiguous(g0), _contiguous(gw)
    g = gram([grad_dir, g0, gw])  # <gd,g0>, <gd,gw> and the forward's Gram, one pass
    # d = lam g0 + (1 - lam) gw: dL/dlam = grad_lam + sum <gd, g0 - gw>
    dlam = grad_lam.double() + g[0, 1] - g[0, 2]
    g00, g01, g11 = g[1, 1], g[1, 2], g[2, 2]
    num, den = g11 - g01, g00 - 2.0 * g01 + g11
    safe = torch.where(den > 0, den, 1.0)
    ratio = num / safe
    # lam = clip(num / den, 0, 1) (1/2 when den = 0): its gradient, as autograd sees it
    dlam = torch.where((den > 0) & (ratio >= 0) & (ratio <= 1), dlam, 0.0)
    d00, d01, d11 = -num / safe**2, (2.0 * num - den) / safe**2, (den - num) / safe**2
    lam64, one_minus = lam.double(), (1.0 - lam).double()
    coef = torch.stack(
        [
            torch.stack([lam64, 2.0 * dlam * d00, dlam * d01]),  # d g00/d g0 = 2 g0, ...
            torch.stack([one_minus, dlam * d01, 2.0 * dlam * d11]),
        ]
    )
    grad_g0, grad_gw = lincomb([grad_dir, g0, gw], coef)
    return grad_g0, grad_gw


@_combine_backward_op.register_fake
def _combine_backward_fake(grad_dir, grad_lam, g0, gw, lam):
    return [torch.empty_like(t) for t in g0], [torch.empty_like(t) for t in gw]


def _combine_setup(ctx, inputs, output):
    g0, gw = inputs
    ctx.n = len(g0)
    ctx.save_for_backward(*g0, *gw, output[1])


def _combine_backward(ctx, grad_dir, grad_lam):
    saved, n = ctx.saved_tensors, ctx.n
    g0, gw, lam = list(saved[:n]), list(saved[n : 2 * n]), saved[2 * n]
    grad_dir = [torch.zeros_like(a) if d is None else d for d, a in zip(grad_dir, g0)]
    if grad_lam is None:
        grad_lam = torch.zeros_like(lam)
    return _combine_backward_op(grad_dir, grad_lam, g0, gw, lam)


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("omnifuse_fast_triton::mgda_min_norm", mutates_args=())
def _mgda_op(
    flat: list[torch.Tensor], num_objectives: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    n = len(flat) // num_objectives
    grads = [_contiguous(flat[t * n : (t + 1) * n]) for t in range(num_objectives)]
    g = gram(grads)
    g = _device_checks.check_gram("mgda_min_norm", g, grads)
    weights = frank_wolfe_min_norm(g)  # fp64 [T], the reference's solver
    (direction,) = lincomb(grads, weights.view(1, -1))  # accumulated in fp64
    return weights.float(), direction


@_mgda_op.register_fake
def _mgda_fake(flat, num_objectives):
    n = len(flat) // num_objectives
    weights = flat[0].new_empty((num_objectives,), dtype=torch.float32)
    return weights, [torch.empty_like(t) for t in flat[:n]]


def mimo_combine(
    g0: list[torch.Tensor], gw: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(lam g0 + (1 - lam) gw per tensor, lam)``; differentiable in ``g0`` and ``gw``."""
    if use_reference("mimo_combine", *g0):  # the ops skipped the Python pass: run it
        _device_checks.host_checks((_device_checks.GRADS,), grads={"g0": g0, "gw": gw})
        return _reference.mimo_combine(list(g0), list(gw))
    return _combine_op(list(g0), list(gw))


def mgda_min_norm(grads: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """T-objective MGDA baseline (Frank-Wolfe on the Gram). Not differentiable."""
    if use_reference("mgda_min_norm", *grads[0]):  # the ops skipped the Python pass: run it
        named = {f"grads[{t}]": g for t, g in enumerate(grads)}
        _device_checks.host_checks((_device_checks.GRADS,), grads=named)
        return _reference.mgda_min_norm([list(g) for g in grads])
    flat = [t.detach() for g in grads for t in g]
    return _mgda_op(flat, len(grads))


_dispatch.register("mimo_combine", "triton", mimo_combine)
_dispatch.register("mgda_min_norm", "triton", mgda_min_norm)
