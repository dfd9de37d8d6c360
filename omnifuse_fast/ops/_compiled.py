"""The "cpu" and "cuda" backends: the compiled custom ops of csrc/ (torch.ops.omnifuse_fast).

Imported lazily by the dispatcher the first time one of these backends is asked for. When the
extension is loaded this module registers, once for both devices:

- a fake (meta) impl of every op, so ``torch.compile`` traces them without running a kernel;
- the autograd formula of every differentiable op, whose backward calls the registered
  ``*_backward`` op (itself a custom op, so the backward graph is traceable too);
- the dispatcher entries of the ten public ops for the "cpu" and "cuda" backends.
"""

from __future__ import annotations

import torch

from omnifuse_fast import _dispatch, _ext
from omnifuse_fast.reference.mimo import frank_wolfe_min_norm, min_norm_lambda


def _cpu_reason(device: torch.device) -> str | None:
    if not _ext.HAS_EXTENSION:
        return f"the compiled extension is not built ({_ext.LOAD_ERROR})"
    if not _ext.HAS_CPU_KERNELS:
        return "the compiled extension has no CPU kernels"
    if device.type != "cpu":
        return f"it runs on CPU tensors, got tensors on {device}"
    return None


def _cuda_reason(device: torch.device) -> str | None:
    if not _ext.HAS_EXTENSION:
        return f"the compiled extension is not built ({_ext.LOAD_ERROR})"
    if not _ext.HAS_CUDA_KERNELS:
        return "the extension was built without CUDA kernels (needs a CUDA torch and nvcc)"
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got tensors on {device}"
    return None


_dispatch.set_availability("cpu", _cpu_reason)
_dispatch.set_availability("cuda", _cuda_reason)

PUBLIC_OPS: tuple[str, ...] = (
    "combination_ids",
    "cra_forward",
    "dwfuse_weights",
    "dwfuse_loss",
    "tla_stats",
    "tla_loss",
    "modality_mix",
    "soft_cross_entropy",
    "mimo_combine",
    "mgda_min_norm",
)
"""The public ops the compiled backends implement."""

_NS = "omnifuse_fast"


def _q(name: str) -> str:
    return f"{_NS}::{name}"


# --------------------------------------------------------------------------------------------
# Fake impls: output shapes and dtypes only.
# --------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    fake = torch.library.register_fake

    @fake(_q("combination_ids"))
    def _(present):
        torch._check(present.dim() == 2, lambda: "present must be [B, M]")
        return present.new_empty((present.shape[0],), dtype=torch.int64)

    @fake(_q("cra_forward"))
    def _(x, w1, b1, w2, b2, activation):
        torch._check(x.dim() == 2 and w1.dim() == 3, lambda: "x [B, F], w1 [K, H, F]")
        torch._check(w1.shape[2] == x.shape[1], lambda: "w1 [K, H, F] must match x [B, F]")
        k, h = w1.shape[0], w1.shape[1]
        return x.new_empty(x.shape), x.new_empty((x.shape[0], k * h))

    @fake(_q("cra_backward"))
    def _(grad_out, grad_latents, x, w1, b1, w2, b2, activation):
        torch._check(grad_out.shape == x.shape, lambda: "grad_out must match x")
        return tuple(torch.empty_like(t) for t in (x, w1, b1, w2, b2))

    @fake(_q("dwfuse_weights"))
    def _(logits, labels, beta):
        torch._check(logits.dim() == 3, lambda: "logits must be [B, M, C]")
        if labels.dim() == 2:  # multilabel: one weight per label
            return logits.new_empty(logits.shape)
        return logits.new_empty(logits.shape[:2])

    @fake(_q("dwfuse_weights_backward"))
    def _(grad_weights, logits, labels, beta):
        return torch.empty_like(logits)

    @fake(_q("dwfuse_loss"))
    def _(logits, labels, beta, detach_weight):
        torch._check(logits.dim() == 3, lambda: "logits must be [B, M, C]")
        return logits.new_empty(())

    @fake(_q("dwfuse_loss_backward"))
    def _(grad, logits, labels, beta, detach_weight):
        return torch.empty_like(logits)

    @fake(_q("tla_stats"))
    def _(logits, labels, comb, num_modalities, distance):
        torch._check(logits.dim() == 2, lambda: "logits must be [B, C]")
        bins = 1 << num_modalities
        return (
            logits.new_empty((bins,), dtype=torch.float32),
            logits.new_empty((bins,), dtype=torch.int64),
        )

    @fake(_q("tla_loss"))
    def _(logits, labels, comb, lazy):
        torch._check(logits.dim() == 2, lambda: "logits must be [B, C]")
        return logits.new_empty(())

    @fake(_q("tla_loss_backward"))
    def _(grad, logits, labels, comb, lazy):
        return torch.empty_like(logits)

    @fake(_q("modality_mix"))
    def _(v, labels, src, num_classes, weights):
        torch._check(v.dim() == 3 and src.dim() == 2, lambda: "v [B, M, D], src [M, B]")
        torch._check(src.shape[0] == v.shape[1], lambda: "src must be [M, B]")
        bsz = src.shape[1]
        return v.new_empty((bsz, v.shape[1], v.shape[2])), v.new_empty((bsz, num_classes))

    @fake(_q("modality_mix_backward"))
    def _(grad_v_mix, src, batch):
        torch._check(grad_v_mix.dim() == 3, lambda: "grad_v_mix must be [B, M, D]")
        return grad_v_mix.new_empty((batch, grad_v_mix.shape[1], grad_v_mix.shape[2]))

    @fake(_q("soft_cross_entropy"))
    def _(logits, soft_labels):
        torch._check(logits.shape == soft_labels.shape, lambda: "soft_labels must match logits")
        return logits.new_empty(())

    @fake(_q("soft_cross_entropy_backward"))
    def _(grad, logits, soft_labels):
        return torch.empty_like(logits), torch.empty_like(soft_labels)

    @fake(_q("soft_cross_entropy_backward_logits"))
    def _(grad, logits, soft_labels):
        return torch.empty_like(logits)

    @fake(_q("mimo_gram"))
    def _(g0, gw):
        torch._check(len(g0) == len(gw), lambda: "g0 and gw must have the same length")
        return g0[0].new_empty((3,), dtype=torch.float64)

    @fake(_q("mimo_direction"))
    def _(g0, gw, lam):
        torch._check(len(g0) == len(gw), lambda: "g0 and gw must have the same length")
        return [torch.empty_like(t) for t in g0]


# --------------------------------------------------------------------------------------------
# Autograd: each backward calls the matching registered backward op (traceable).
# --------------------------------------------------------------------------------------------


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _register_autograd() -> None:
    ops = torch.ops.omnifuse_fast
    reg = torch.library.register_autograd

    # cra_forward: the backward recomputes the chain from x (nothing but inputs is saved)
    def cra_setup(ctx, inputs, output):
        x, w1, b1, w2, b2, activation = inputs
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.activation = activation
        ctx.lat_shape = output[1].shape

    def cra_bwd(ctx, grad_out, grad_latents):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        grad_out = _zeros_if_none(grad_out, x)
        if grad_latents is None:
            grad_latents = x.new_zeros(ctx.lat_shape)
        grads = ops.cra_backward(grad_out, grad_latents, x, w1, b1, w2, b2, ctx.activation)
        return (*grads, None)

    reg(_q("cra_forward"), cra_bwd, setup_context=cra_setup)

    def dw_setup(ctx, inputs, output):
        logits, labels, beta = inputs[:3]
        ctx.save_for_backward(logits, labels)
        ctx.beta = beta
        ctx.detach_weight = inputs[3] if len(inputs) > 3 else None

    def dww_bwd(ctx, grad):
        logits, labels = ctx.saved_tensors
        return ops.dwfuse_weights_backward(grad, logits, labels, ctx.beta), None, None

    reg(_q("dwfuse_weights"), dww_bwd, setup_context=dw_setup)

    def dwl_bwd(ctx, grad):
        logits, labels = ctx.saved_tensors
        g = ops.dwfuse_loss_backward(grad, logits, labels, ctx.beta, ctx.detach_weight)
        return g, None, None, None

    reg(_q("dwfuse_loss"), dwl_bwd, setup_context=dw_setup)

    def tla_setup(ctx, inputs, output):
        logits, labels, comb, lazy = inputs
        ctx.save_for_backward(logits, labels, comb)
        ctx.lazy = lazy

    def tla_bwd(ctx, grad):
        logits, labels, comb = ctx.saved_tensors
        return ops.tla_loss_backward(grad, logits, labels, comb, ctx.lazy), None, None, None

    reg(_q("tla_loss"), tla_bwd, setup_context=tla_setup)

    # modality_mix: v_mix scatter-adds back into v; soft labels are linear in the weights
    def mix_setup(ctx, inputs, output):
        v, labels, src, num_classes, weights = inputs
        ctx.save_for_backward(labels, src, weights)
        ctx.batch = v.shape[0]

    def mix_bwd(ctx, grad_v_mix, grad_soft):
        labels, src, weights = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[0] and grad_v_mix is not None:
            grad_v = ops.modality_mix_backward(grad_v_mix, src, ctx.batch)
        grad_w = None
        if weights is not None and ctx.needs_input_grad[4] and grad_soft is not None:
            src_labels = labels[src].transpose(0, 1)  # [B, M]
            same = (src_labels == src_labels[:, :1]).all(dim=1, keepdim=True)
            grad_w = torch.where(same, 0.0, grad_soft.float().gather(1, src_labels))
            grad_w = grad_w.sum_to_size(weights.shape).to(weights.dtype)
        return grad_v, None, None, None, grad_w

    reg(_q("modality_mix"), mix_bwd, setup_context=mix_setup)

    def sce_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def sce_bwd(ctx, grad):
        logits, soft_labels = ctx.saved_tensors
        if logits.device.type == "cpu" and not ctx.needs_input_grad[1]:
            # usual case, soft labels as targets: skip their gradient's pass (CPU kernel)
            return ops.soft_cross_entropy_backward_logits(grad, logits, soft_labels), None
        return tuple(ops.soft_cross_entropy_backward(grad, logits, soft_labels))

    reg(_q("soft_cross_entropy"), sce_bwd, setup_context=sce_setup)

    # MIMO: Gram and direction are polynomial in the gradients; written with torch ops
    def gram_setup(ctx, inputs, output):
        g0, gw = inputs
        ctx.save_for_backward(*g0, *gw)
        ctx.n = len(g0)

    def gram_bwd(ctx, grad):
        saved = ctx.saved_tensors
        g0, gw = saved[: ctx.n], saved[ctx.n :]
        d0 = [
            (2.0 * grad[0] * a.double() + grad[1] * b.double()).to(a.dtype) for a, b in zip(g0, gw)
        ]
        dw = [
            (grad[1] * a.double() + 2.0 * grad[2] * b.double()).to(b.dtype) for a, b in zip(g0, gw)
        ]
        return d0, dw

    reg(_q("mimo_gram"), gram_bwd, setup_context=gram_setup)

    def dir_setup(ctx, inputs, output):
        g0, gw, lam = inputs
        ctx.save_for_backward(lam, *g0, *gw)
        ctx.n = len(g0)

    def dir_bwd(ctx, grads):
        lam, *rest = ctx.saved_tensors
        g0, gw = rest[: ctx.n], rest[ctx.n :]
        grads = [_zeros_if_none(g, a) for g, a in zip(grads, g0)]
        d0 = [(lam * g.float()).to(g.dtype) for g in grads]
        dw = [((1.0 - lam) * g.float()).to(g.dtype) for g in grads]
        dlam = sum(torch.sum(g.float() * (a.float() - b.float())) for g, a, b in zip(grads, g0, gw))
        return d0, dw, dlam.reshape(lam.shape).to(lam.dtype)

    reg(_q("mimo_direction"), dir_bwd, setup_context=dir_setup)


# --------------------------------------------------------------------------------------------
# The public ops on the "cpu" and "cuda" backends (arguments already validated).
# --------------------------------------------------------------------------------------------


def combination_ids(present: torch.Tensor) -> torch.Tensor:
    return torch.ops.omnifuse_fast.combination_ids(present)


def cra_forward(x, w1, b1, w2, b2, activation="relu"):
    out, latents = torch.ops.omnifuse_fast.cra_forward(x, w1, b1, w2, b2, activation)
    return out, latents


def dwfuse_weights(modality_logits, labels, beta=0.5):
    return torch.ops.omnifuse_fast.dwfuse_weights(modality_logits, labels, beta)


def dwfuse_loss(modality_logits, labels, beta=0.5, detach_weight=True):
    return torch.ops.omnifuse_fast.dwfuse_loss(modality_logits, labels, beta, detach_weight)


def tla_stats(logits, labels, comb, num_modalities, distance="ce"):
    # a statistic for mining: never part of the autograd graph (like the reference)
    sums, counts = torch.ops.omnifuse_fast.tla_stats(
        logits.detach(), labels, comb, num_modalities, distance
    )
    return sums, counts


def tla_loss(logits, labels, comb, lazy):
    return torch.ops.omnifuse_fast.tla_loss(logits, labels, comb, lazy)


def modality_mix(v, labels, src, num_classes, weights=None):
    v_mix, soft = torch.ops.omnifuse_fast.modality_mix(v, labels, src, num_classes, weights)
    return v_mix, soft


def soft_cross_entropy(logits, soft_labels):
    return torch.ops.omnifuse_fast.soft_cross_entropy(logits, soft_labels)


def mimo_combine(g0, gw):
    """Gram in one fused pass, lambda with the reference's torch ops, direction in one pass."""
    gram = torch.ops.omnifuse_fast.mimo_gram(g0, gw)
    lam = min_norm_lambda(gram[0], gram[1], gram[2])
    return list(torch.ops.omnifuse_fast.mimo_direction(g0, gw, lam)), lam


def mgda_min_norm(grads):
    """The T-objective baseline: Gram from fused pair passes, then the reference Frank-Wolfe."""
    t = len(grads)
    rows = [[None] * t for _ in range(t)]
    if t == 1:
        rows[0][0] = torch.ops.omnifuse_fast.mimo_gram(grads[0], grads[0])[0]
    for i in range(t):
        for j in range(i + 1, t):
            g = torch.ops.omnifuse_fast.mimo_gram(grads[i], grads[j])
            rows[i][i], rows[j][j] = g[0], g[2]
            rows[i][j] = rows[j][i] = g[1]
    gram = torch.stack([torch.stack(r) for r in rows])
    weights = frank_wolfe_min_norm(gram)
    direction = []
    for parts in zip(*grads):
        acc = sum(w * p.double() for w, p in zip(weights, parts))
        direction.append(acc.to(parts[0].dtype))
    return weights.float(), direction


def _register_dispatch() -> None:
    impls = globals()
    for name in PUBLIC_OPS:
        for backend in ("cpu", "cuda"):
            _dispatch.register(name, backend, impls[name])


if _ext.HAS_EXTENSION:
    _register_fakes()
    _register_autograd()
    _register_dispatch()
