"""Shared pieces of the Gram-matrix methods: every method below that combines representation
gradients linearly computes its task weights w [M] from the global Gram matrix G [M, M] (and
its own state) and passes sum_m w_m g_m on; this is exact under data parallelism because G is
all-reduced (see GradientBalancer.global_gram) and every rank then computes the same w."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from balancing.base import GradientBalancer, combine

EPS = 1e-12


class GramWeighting(GradientBalancer):
    """sum_m w_m g_m with w = self.gram_weights(G). Methods whose weights live on the simplex
    set `on_simplex`: their combination is scaled by M, so that uniform weights give the
    equal-weights gradient and every method trains the shared layers at the same scale."""

    on_simplex = False

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        gram = self.global_gram(grads)  # [M, M]
        w = self.gram_weights(gram)  # [M]
        if self.on_simplex:
            self.weights.copy_(w)
            w = w * self.num_tasks
        else:
            self.weights.copy_(w)
        n = gram.diagonal().clamp(min=0).sqrt()
        self.grad_norm.copy_(n)
        self.grad_norm_balanced.copy_(w.abs() * n)
        return combine(w, grads)  # [B, n']


def solve_small(a: List[List[float]], b: List[float]) -> Optional[List[float]]:
    """Gaussian elimination with partial pivoting in Python floats; None if singular.

    For the tiny systems of the Gram methods (M + 1 unknowns at most). Deliberately not LAPACK: its result
    can differ in the last bits between processes (alignment-dependent kernels), and every
    rank must compute bit-identical task weights."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    scale = max((abs(x) for row in a for x in row), default=0.0)
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) <= 1e-13 * scale:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def min_norm_simplex(gram: torch.Tensor) -> torch.Tensor:
    """argmin_{a in simplex} a^T G a: Wolfe's min-norm-point algorithm (Wolfe 1976, "Finding the
    nearest point in a polytope", Math. Programming 11), on the Gram matrix alone, in Python
    floats (bit-identical on every rank, see `solve_small`).

    Major cycle: add the task k minimising (G a)_k (the vertex most opposed to the current point)
    unless a^T G a - (G a)_k is within tolerance (then a is optimal: the KKT conditions hold).
    Minor cycle: the min-norm point of the affine hull of the support (KKT system
    [G_SS 1; 1^T 0]); if it leaves the simplex, step to its boundary and drop the tasks that
    reach 0. Finite and exact; a few cycles per task, so M = 16 costs microseconds to
    milliseconds where enumerating the 2^M supports would take seconds."""
    g = gram.detach().to("cpu", torch.float64).tolist()
    m = len(g)
    scale = max((g[i][i] for i in range(m)), default=0.0)
    if scale <= 0:
        return torch.full((m,), 1.0 / m, dtype=gram.dtype, device=gram.device)
    tol = 1e-12 * scale
    first = min(range(m), key=lambda i: g[i][i])
    support, w = [first], {first: 1.0}
    for _ in range(50 * m):  # major cycles (Wolfe: finite; a guard against round-off loops)
        ga = [sum(g[k][i] * w[i] for i in support) for k in range(m)]  # (G a)_k
        norm2 = sum(w[i] * ga[i] for i in support)
        j = min(range(m), key=lambda k: ga[k])
        if j in w or norm2 - ga[j] <= tol:
            break
        support.append(j)
        w[j] = 0.0
        support, w = _minor_cycles(g, support, w)
    a = [w.get(i, 0.0) for i in range(m)]
    total = sum(a)
    return torch.tensor([x / total for x in a], dtype=gram.dtype, device=gram.device)


def _minor_cycles(g: List[List[float]], support: List[int], w: dict) -> Tuple[List[int], dict]:
    while True:
        k = len(support)
        kkt = [[g[i][j] for j in support] + [1.0] for i in support] + [[1.0] * k + [0.0]]
        sol = solve_small(kkt, [0.0] * k + [1.0])
        if sol is None:  # the new point is (numerically) in the support's affine hull: without it
            return support[:-1], {i: w[i] for i in support[:-1]}
        alpha = sol[:k]
        if min(alpha) > 1e-15:
            return support, dict(zip(support, alpha))
        # step from w towards alpha until the first weight reaches 0
        steps = [w[i] / (w[i] - al) for i, al in zip(support, alpha) if al <= 1e-15 and w[i] - al > 0]
        theta = min(steps) if steps else 1.0
        w = {i: max(w[i] + theta * (al - w[i]), 0.0) for i, al in zip(support, alpha)}
        keep = [i for i in support if w[i] > 1e-15]
        support, w = keep, {i: w[i] for i in keep}


def min_norm_weights(gram: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """MGDA weights [M]: the min-norm point over the tasks with a non-zero gradient (a task
    without labels would make the min-norm point 0); `fallback` if no task has one."""
    active = gram.diagonal() > 0
    if not bool(active.any()):
        return fallback.clone()
    idx = active.nonzero().squeeze(1)
    w = torch.zeros_like(fallback)
    w[idx] = min_norm_simplex(gram[idx][:, idx]).to(w.dtype)
    return w
