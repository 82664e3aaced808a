"""An independent, literal implementation of MultiBalance (Algorithm 3) on explicit gradient
matrices, in numpy float64, written from the paper: per step and per task, line 6
u_m = (1 - gamma) u_m + gamma ||g_m||, line 7 v_m = g_m / u_m, line 10 lambda = Proj(lambda -
beta V^T (V lambda + rho V lambda0)) (or its cosine form, Sec. 5), line 11 the combination. It
builds v_m and a = sum_m d_m v_m as vectors (no Gram-matrix algebra) and projects onto the
simplex by bisection on the threshold (no sorting)."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from balancing.weighting import solve_small


def project_simplex_bisect(y: np.ndarray, mass: float = 1.0) -> np.ndarray:
    """argmin ||x - y|| on {x >= 0, sum x = mass}: x = max(y - t, 0) with t found by bisection."""
    lo, hi = y.min() - mass, y.max()
    for _ in range(200):
        t = (lo + hi) / 2
        if np.maximum(y - t, 0).sum() > mass:
            lo = t
        else:
            hi = t
    return np.maximum(y - (lo + hi) / 2, 0)


class ReferenceMultiBalance:
    def __init__(self, m: int, beta: float, rho: float, gamma: float, ema: bool, cosine: bool,
                 scale_by_tasks: bool = True, rescale: str = "paper", step: str = "paper", gram_ema: float = 0.0):
        self.lam = np.full(m, 1.0 / m)
        self.prior = np.full(m, 1.0 / m)
        self.u = np.zeros(m)
        self.seen = np.zeros(m, bool)
        self.beta, self.rho, self.gamma, self.ema, self.cosine = beta, rho, gamma, ema, cosine
        self.scale = m if scale_by_tasks else 1.0
        self.rescale, self.step_kind = rescale, step
        self.gram_ema, self.tracked, self.tracked_seen = gram_ema, np.zeros((m, m)), np.zeros(m, bool)

    def step(self, g: np.ndarray) -> np.ndarray:
        """g [M, K] task gradients -> combined gradient [K]; updates lambda."""
        m = g.shape[0]
        v = np.zeros_like(g)
        active = np.array([np.linalg.norm(g[i]) > 0 for i in range(m)])
        for i in range(m):
            n = np.linalg.norm(g[i])
            if not active[i]:
                continue
            if self.ema:
                self.u[i] = (1 - self.gamma) * self.u[i] + self.gamma * n if self.seen[i] else n
                self.seen[i] = True
                v[i] = g[i] / self.u[i] if self.rescale == "paper" else self.u[i] / n * g[i]
            else:
                v[i] = g[i]
        if self.gram_ema > 0:
            direction, beta = self._tracked_direction(g, v, active)
            return self._finish(direction, beta, active, v)
        a = sum((self.lam[i] + self.rho * self.prior[i]) * v[i] for i in range(m))
        direction = np.array([v[i] @ a for i in range(m)])
        if self.cosine:
            direction = np.array([
                v[i] @ a / (np.linalg.norm(v[i]) * np.linalg.norm(a)) if active[i] else 0.0
                for i in range(m)])
        beta = self.beta
        if self.step_kind == "capped":  # 1 / min(trace, max row sum) of the Jacobian's main part
            idx = np.flatnonzero(active)
            vn = np.array([np.linalg.norm(v[i]) for i in idx])
            jac = np.array([[v[i] @ v[j] for j in idx] for i in idx])
            if self.cosine:
                jac = jac / np.sqrt(np.outer(vn, vn)) / np.linalg.norm(a)
            beta = min(beta, 1.0 / min(np.trace(jac), np.abs(jac).sum(1).max()))
        return self._finish(direction, beta, active, v)

    def _tracked_direction(self, g: np.ndarray, v: np.ndarray, active: np.ndarray):
        """gram_ema > 0: an EMA of the Grams <g_i, g_j> over steps where both tasks have a gradient
        (a pair's first value taken as it is), and the step computed from it: v_i = s_i g_i,
        <v_i, v_j>~ = s_i s_j G~_ij, a~ = sum d_j v_j in that geometry."""
        m = g.shape[0]
        for i in range(m):
            for j in range(m):
                if active[i] and active[j]:
                    gij = g[i] @ g[j]
                    both = self.tracked_seen[i] and self.tracked_seen[j]
                    self.tracked[i, j] = (1 - self.gram_ema) * self.tracked[i, j] + self.gram_ema * gij if both else gij
        self.tracked_seen |= active
        s = np.array([np.linalg.norm(v[i]) / np.linalg.norm(g[i]) if active[i] else 0.0 for i in range(m)])
        gv = np.outer(s, s) * self.tracked
        d = self.lam + self.rho * self.prior
        direction = gv @ d
        norm_a = np.sqrt(d @ gv @ d)
        vn = np.sqrt(np.diag(gv))
        if self.cosine:
            direction = np.where(active, direction / np.maximum(vn * norm_a, 1e-300), 0.0)
        beta = self.beta
        if self.step_kind == "capped":
            idx = np.flatnonzero(active)
            jac = gv[np.ix_(idx, idx)]
            if self.cosine:
                jac = jac / np.sqrt(np.outer(vn[idx], vn[idx])) / norm_a
            beta = min(beta, 1.0 / min(np.trace(jac), np.abs(jac).sum(1).max()))
        return direction, beta

    def _finish(self, direction: np.ndarray, beta: float, active: np.ndarray, v: np.ndarray) -> np.ndarray:
        m = len(active)
        y = self.lam - beta * direction
        new = self.lam.copy()
        new[active] = project_simplex_bisect(y[active], 1.0 - self.lam[~active].sum())
        self.lam = new
        size = self.u[self.seen].mean() if self.ema and self.rescale == "paper" and self.seen.any() else 1.0
        return self.scale * size * sum(self.lam[i] * v[i] for i in range(m))


def min_norm_simplex_exact(gram: torch.Tensor) -> torch.Tensor:
    """argmin_{a in simplex} a^T G a, exactly, by enumerating the active sets (M <= 10).

    On each support S the minimiser with sum(a_S) = 1 solves the KKT system
    [G_SS 1; 1^T 0] [a_S; mu] = [0; 1]; the best feasible (a_S >= 0) candidate over all S is
    the global minimum (the problem is convex, and its solution lies on some support)."""
    m = gram.shape[0]
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
