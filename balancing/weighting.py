"""Shared pieces of the Gram-matrix methods: every method below that combines representation
gradients linearly computes its task weights w [M] from the global Gram matrix G [M, M] (and
its own state) and passes sum_m w_m g_m on; this is exact under data parallelism because G is
all-reduced (see GradientBalancer.global_gram) and every rank then computes the same w."""
from __future__ import annotations

import itertools
from typing import List, Optional

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

    For the tiny systems of the Gram methods (M <= 10). Deliberately not LAPACK: its result
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
    """argmin_{a in simplex} a^T G a, exactly, by enumerating the active sets (M <= 10).

    On each support S the minimiser with sum(a_S) = 1 solves the KKT system
    [G_SS 1; 1^T 0] [a_S; mu] = [0; 1]; the best feasible (a_S >= 0) candidate over all S is
    the global minimum (the problem is convex, and its solution lies on some support)."""
    m = gram.shape[0]
    if m > 10:
        raise ValueError("exact min-norm solver enumerates 2^M supports; M <= 10")
    g = gram.detach().to("cpu", torch.float64).tolist()
    best, best_val = [1.0 / m] * m, float("inf")
    for size in range(1, m + 1):
        for s in itertools.combinations(range(m), size):
            kkt = [[g[i][j] for j in s] + [1.0] for i in s] + [[1.0] * size + [0.0]]
            sol = solve_small(kkt, [0.0] * size + [1.0])
            if sol is None or min(sol[:size]) < -1e-10:
                continue  # singular (a smaller support has the same optimum) or infeasible
            a = [0.0] * m
            for i, v in zip(s, sol[:size]):
                a[i] = max(v, 0.0)
            total = sum(a)
            a = [v / total for v in a]
            val = sum(a[i] * g[i][j] * a[j] for i in range(m) for j in range(m))
            if best_val == float("inf") or val < best_val - 1e-15 * max(1.0, abs(best_val)):
                best, best_val = a, val
    return torch.tensor(best, dtype=gram.dtype, device=gram.device)


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
