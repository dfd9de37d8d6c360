"""MIMO (SPEC section 6): two-objective min-norm direction, and the T-objective MGDA baseline.

Dot products accumulate in fp64 so the Gram (and lambda) does not depend on tensor order.
"""

from __future__ import annotations

import torch

from omnifuse_fast.reference._common import acc_dtype, upcast


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` as a 0-dim fp64 tensor."""
    return sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b))  # type: ignore[return-value]


def min_norm_lambda(g00: torch.Tensor, g01: torch.Tensor, g11: torch.Tensor) -> torch.Tensor:
    """``clip((g_w - g_0) . g_w / |g_w - g_0|^2, 0, 1)``, 1/2 when the gradients coincide."""
    denom = g00 - 2.0 * g01 + g11
    lam = torch.where(denom > 0, (g11 - g01) / torch.where(denom > 0, denom, 1.0), 0.5)
    return lam.clamp(0.0, 1.0).float()


def mimo_combine(
    g0: list[torch.Tensor], gw: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``d = lam g_0 + (1 - lam) g_w`` per tensor, and ``lam`` (0-dim fp32)."""
    lam = min_norm_lambda(dot(g0, g0), dot(g0, gw), dot(gw, gw))
    direction = []
    for a, b in zip(g0, gw):
        lam_acc = lam.to(acc_dtype(a.dtype))  # 1 - lam in the accumulation dtype too
        direction.append((lam_acc * upcast(a) + (1.0 - lam_acc) * upcast(b)).to(a.dtype))
    return direction, lam


def gram_matrix(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` over T objectives, fp64 ``[T, T]``."""
    t = len(grads)
    g = torch.zeros(t, t, dtype=torch.float64, device=grads[0][0].device)
    for i in range(t):
        for j in range(i, t):
            g[i, j] = g[j, i] = dot(grads[i], grads[j])
    return g


def best_pair_start(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm point over the best pair of vertices (closed form), as weights ``[T]``.

    Sener & Koltun start Frank-Wolfe here: exact for T = 2, and when two gradients conflict
    head-on (a Pareto-stationary pair) it is already the answer, which plain Frank-Wolfe from
    the uniform point only approaches like 1/iterations.
    """
    t = gram.shape[0]
    g = gram.tolist()
    best, pick = g[0][0], (0, 0, 1.0)
    for i in range(t):
        for j in range(i + 1, t):
            den = g[i][i] - 2.0 * g[i][j] + g[j][j]
            lam = min(max((g[j][j] - g[i][j]) / den, 0.0), 1.0) if den > 0 else 0.5
            norm = lam * lam * g[i][i] + 2 * lam * (1 - lam) * g[i][j] + (1 - lam) ** 2 * g[j][j]
            if norm < best:
                best, pick = norm, (i, j, lam)
    w = torch.zeros(t, dtype=torch.float64, device=gram.device)
    i, j, lam = pick
    w[j] += 1.0 - lam
    w[i] += lam
    return w


def frank_wolfe_min_norm(
    gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-6
) -> torch.Tensor:
    """Min-norm point of the convex hull by Frank-Wolfe on the Gram (Sener & Koltun, 2018)."""
    w = best_pair_start(gram)
    for _ in range(max_iter):
        gw = gram @ w
        i = int(torch.argmin(gw))
        # exact line search between the current point u = sum w g and the vertex g_i
        uu, ui, ii = w @ gw, gw[i], gram[i, i]
        denom = uu - 2.0 * ui + ii
        gamma = (
            ((ii - ui) / denom).clamp(0.0, 1.0)
            if denom > 0
            else torch.ones((), dtype=torch.float64)
        )
        new_w = gamma * w
        new_w[i] += 1.0 - gamma
        if float((new_w - w).abs().sum()) < tol:
            return new_w
        w = new_w
    return w


def mgda_min_norm(grads: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """T-objective MGDA: Frank-Wolfe weights ``[T]`` (fp32) and the direction ``sum_t w_t g_t``."""
    weights = frank_wolfe_min_norm(gram_matrix(grads))
    direction = []
    for parts in zip(*grads):
        acc = sum(w * p.double() for w, p in zip(weights, parts))
        direction.append(acc.to(parts[0].dtype))  # type: ignore[union-attr]
    return weights.float(), direction
