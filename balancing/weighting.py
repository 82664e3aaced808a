"""Shared pieces of the Gram-matrix methods: every method below that combines representation
gradients linearly computes its task weights w [M] from the global Gram matrix G [M, M] (and
its own state) and passes sum_m w_m g_m on; this is exact under data parallelism because G is
all-reduced (see GradientBalancer.global_gram) and every rank then computes the same w."""
from __future__ import annotations

import itertools

import torch

from balancing.base import GradientBalancer

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
        return torch.einsum("m,m...->...", w.to(grads.dtype), grads)  # [B, n']


def min_norm_simplex(gram: torch.Tensor) -> torch.Tensor:
    """argmin_{a in simplex} a^T G a, exactly, by enumerating the active sets (M <= 10).

    On each support S the minimiser with sum(a_S) = 1 solves the KKT system
    [G_SS 1; 1^T 0] [a_S; mu] = [0; 1]; the best feasible (a_S >= 0) candidate over all S is
    the global minimum (the problem is convex, and its solution lies on some support)."""
    m = gram.shape[0]
    if m > 10:
        raise ValueError("exact min-norm solver enumerates 2^M supports; M <= 10")
    g = gram.detach().to("cpu", torch.float64)
    best, best_val = torch.full((m,), 1.0 / m, dtype=torch.float64), float("inf")
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            s = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = g[s][:, s]
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1
            sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.squeeze(1)[:size]
            if (sol < -1e-10).any() or abs(float(sol.sum()) - 1) > 1e-6:
                continue
            a = torch.zeros(m, dtype=torch.float64)
            a[s] = sol.clamp(min=0)
            a /= a.sum()
            val = float(a @ g @ a)
            if val < best_val - 1e-15:
                best, best_val = a, val
    return best.to(gram.device, gram.dtype)
