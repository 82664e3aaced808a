"""MultiBalance (He et al. 2024, "MultiBalance: Multi-Objective Gradient Balancing in
Industrial-Scale Multi-Task Recommendation System", arXiv 2411.11871, Algorithm 3).

Per step, with g_m the gradient of task m's loss w.r.t. its copy of the shared
representation ([B, n'], global batch):
  1. n_m = ||g_m||
  2. u_m <- (1 - gamma) u_m + gamma n_m       (first step of a task: u_m = n_m)  [line 6]
  3. v_m = (u_m / n_m) g_m                                                     [line 7]
  4. d = lambda + rho lambda0,  D_m = <v_m, V d>   (= grad of 1/2 ||V d||^2 in lambda), or the
     cosine form D_m = <v_m, V d> / (||v_m|| ||V d||) the paper uses in practice (Sec. 5)
  5. lambda <- Proj_simplex(lambda - beta D)                                   [line 10, eq. 12]
  6. the shared layers receive sum_m lambda_m v_m                              [line 11]
Steps 1-5 need only the M x M Gram matrix G = [<g_i, g_j>] (Gram(V) = S G S with
S = diag(u / n)); with several ranks it is all-reduced, so every rank computes the same lambda.

A task whose gradient is zero (no labelled row in the batch) keeps its EMA and its weight;
the other weights move on the simplex of the remaining mass. No NaN, no host sync.

`deferred` (default on) uses the previous step's Gram: step t combines its gradients with the
weights and scales computed from step t-1's global Gram, whose reduction then never blocks the
backward; under DDP it travels as the gradient of a carrier parameter (`DeferredGram`), in DDP's
own all-reduce, so it costs no collective of its own. Weights stay identical on every rank;
they follow the exact sequence one step late (the first step of a run uses the current weights
on the raw gradients; the Gram in flight is checkpointed, so a resumed run continues exactly).
Off: the per-step algorithm, with one all-reduce of M^2 numbers inside every backward.

The M-sized step runs in Python floats (`multibalance_update_host`) wherever the Gram is on the
host: in CPU training, and with `deferred` on an accelerator, where the previous step's Gram is
copied to pinned host memory in the forward (`DeferredGram.prefetch`) and read in the backward
without stalling the device; the new coefficients go back in one asynchronous upload. Each torch
op there costs microseconds of dispatch or a kernel launch, and the step would take about 40.
The exact form on an accelerator runs the same step as sync-free tensor ops
(`multibalance_update`): its Gram is this step's, and reading it would stall the device queue.

`scale_by_tasks` (default on) passes M * sum_m lambda_m v_m on, so that lambda = lambda0 =
uniform without EMA reproduces the equal-weights gradient exactly and the shared layers'
effective learning rate matches the equal-weights baseline; off gives the paper's literal sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import List, Optional, Sequence, Tuple

import torch

from balancing.base import DeferredGram, GradientBalancer, combine, local_gram
from balancing.simplex import project_simplex

EPS = 1e-12


@dataclass
class MultiBalanceConfig:
    beta: float = 1.0  # weight learning rate (paper: 1.0 ads, 5.0 feeds)
    rho: float = 0.1  # prior coefficient
    gamma: float = 0.01  # EMA coefficient of the gradient norms
    ema: bool = True  # False: the paper's "remove EMA" ablation (v_m = g_m)
    cosine: bool = True  # cosine direction (paper, Sec. 5) instead of the raw gradient
    prior: List[float] = field(default_factory=list)  # lambda0; empty = uniform
    scale_by_tasks: bool = True
    deferred: bool = True  # weights from the previous step's Gram (see the module docstring)


def multibalance_update(gram: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, prior: torch.Tensor,
                        cfg: MultiBalanceConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Algorithm 3 from the Gram matrix alone.

    gram [M, M], lam [M] (on the simplex), u [M] (EMA of norms; 0 = not yet seen), prior [M].
    Returns (new lambda, new u, s, n), all [M], with v_m = s_m g_m and n_m = ||g_m||.
    Written with few, fused ops: it runs in the backward's critical path, where every small
    kernel launch (GPU) or op dispatch (CPU) counts."""
    n = gram.diagonal().clamp(min=0).sqrt()  # [M]
    active = n > 0
    if cfg.ema:
        u_new = torch.where(active, torch.where(u > 0, torch.lerp(u, n, cfg.gamma), n), u)
        s = u_new * active / n.clamp(min=EPS)  # 0 for a task without gradient
    else:
        u_new = torch.where(active, n, u)
        s = active.to(gram.dtype)
    gram_v = gram * torch.outer(s, s)  # [M, M] Gram of V
    d = torch.add(lam, prior, alpha=cfg.rho)  # [M]
    direction = gram_v @ d  # [M]: <v_m, V d>
    if cfg.cosine:
        norm_a = (d @ direction).clamp(min=0).sqrt()  # ||V d||
        direction = direction / (s * n * norm_a).clamp(min=EPS)  # ||v_m|| = s_m n_m
    lam_new = project_simplex(torch.add(lam, direction, alpha=-cfg.beta), active, lam)
    return lam_new, u_new, s, n


def multibalance_update_host(gram: Sequence[Sequence[float]], lam: Sequence[float], u: Sequence[float],
                             prior: Sequence[float], cfg: MultiBalanceConfig, factor: float = 1.0
                             ) -> Tuple[List[float], List[float], List[float], List[float]]:
    """`multibalance_update` in Python floats (same arguments as lists, same results), for the
    Gram matrix factor * gram. Plain loops: this runs cold once per step, where every Python
    object it creates costs."""
    m = len(lam)
    n, u_new, s, sd, active = [0.0] * m, list(u), [0.0] * m, [0.0] * m, [False] * m
    d = [li + cfg.rho * pi for li, pi in zip(lam, prior)]
    for i in range(m):
        n[i] = ni = math.sqrt(max(gram[i][i] * factor, 0.0))
        if ni > 0:
            active[i] = True
            if cfg.ema:
                u_new[i] = u[i] + cfg.gamma * (ni - u[i]) if u[i] > 0 else ni
                s[i] = u_new[i] / ni
            else:
                u_new[i], s[i] = ni, 1.0
        sd[i] = s[i] * d[i]  # S d
    direction, norm2 = [0.0] * m, 0.0
    for i in range(m):
        row = gram[i]
        acc = 0.0
        for j in range(m):
            acc += row[j] * sd[j]
        direction[i] = s[i] * acc * factor  # <v_i, V d>
        norm2 += d[i] * direction[i]  # ||V d||^2 = d . direction
    y = [0.0] * m
    norm_a = math.sqrt(max(norm2, 0.0))
    for i in range(m):
        x = direction[i] / max(s[i] * n[i] * norm_a, EPS) if cfg.cosine else direction[i]
        y[i] = lam[i] - cfg.beta * x
    return project_simplex_host(y, active, lam), u_new, s, n


def project_simplex_host(y: Sequence[float], active: Sequence[bool], fallback: Sequence[float]) -> List[float]:
    """`balancing.simplex.project_simplex` in Python floats: the active entries onto the simplex
    of the mass the inactive ones (kept at `fallback`) leave (Duchi et al. 2008, Fig. 1)."""
    mass = 1.0 - sum(f for f, a in zip(fallback, active) if not a)
    theta, css = 0.0, 0.0
    for k, yk in enumerate(sorted((v for v, a in zip(y, active) if a), reverse=True), start=1):
        css += yk
        if k == 1 or yk * k > css - mass:  # a prefix of k; at least the largest entry
            theta = (css - mass) / k
    return [max(v - theta, 0.0) if a else f for v, a, f in zip(y, active, fallback)]


class MultiBalance(GradientBalancer):
    def __init__(self, num_tasks: int, cfg: MultiBalanceConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        prior = torch.tensor(cfg.prior, dtype=torch.float32) if cfg.prior else torch.full((num_tasks,), 1.0 / num_tasks)
        if prior.shape != (num_tasks,) or (prior < 0).any() or abs(float(prior.sum()) - 1) > 1e-5:
            raise ValueError(f"balancer.multibalance.prior must be {num_tasks} non-negative numbers summing to 1")
        self.register_buffer("prior", prior, persistent=False)  # lambda0 [M], from the config
        self._prior = prior.tolist()  # the same, for the host step
        self.register_buffer("ema_norm", torch.zeros(num_tasks))  # u [M]
        self.weights.copy_(prior)
        self.deferred = DeferredGram(num_tasks) if cfg.deferred else None
        # (lambda, u) as Python floats after a host step: read back from the buffers, which may
        # live on an accelerator, only when unset (first step, after a load or a tensor step)
        self._host: Optional[Tuple[List[float], List[float]]] = None

    def deferred_gram(self) -> Optional[DeferredGram]:
        return self.deferred

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        scale = self.num_tasks if self.cfg.scale_by_tasks else 1.0
        if self.deferred is not None:
            previous = self.deferred.exchange(local_gram(grads))  # (sum over ranks, 1 / W^2) of step t-1
            if previous is None:  # the first step: nothing global yet; the current weights, raw gradients
                return combine(self.weights * scale, grads)
            gram, factor = previous
        else:
            gram, factor = self.global_gram(grads), 1.0
        return combine(self._step(gram, factor, scale), grads)  # [B, n']

    def _step(self, gram: torch.Tensor, factor: float, scale: float) -> torch.Tensor:
        """Updates the state from the global Gram factor * gram [M, M]; -> the coefficients
        scale lambda_m s_m [M], on the buffers' device."""
        if gram.device.type == "cpu":  # CPU training, or the deferred Gram prefetched to the host
            lam, u = self._host or (self.weights.tolist(), self.ema_norm.tolist())
            lam, u, s, n = multibalance_update_host(gram.tolist(), lam, u, self._prior, self.cfg, factor)
            coef = [li * si for li, si in zip(lam, s)]
            state = torch.tensor([lam, u, n, [c * x for c, x in zip(coef, n)], [c * scale for c in coef]],
                                 dtype=self.weights.dtype)  # [5, M]
            # kept as the buffers hold them (float32), so that a run resumed from a checkpoint
            # continues with exactly the state the straight run has
            self._host = (state[0].tolist(), state[1].tolist())
            if self.weights.device.type != "cpu":  # one asynchronous upload
                state = state.pin_memory().to(self.weights.device, non_blocking=True)
            lam_t, u_t, n_t, balanced, coef_t = state.unbind(0)
        else:
            gram = gram.to(self.weights.dtype) * factor
            lam_t, u_t, s_t, n_t = multibalance_update(gram, self.weights, self.ema_norm, self.prior, self.cfg)
            balanced = lam_t * s_t * n_t
            coef_t = lam_t * s_t * scale
            self._host = None
        self.weights.copy_(lam_t)
        self.ema_norm.copy_(u_t)
        self.grad_norm.copy_(n_t)
        self.grad_norm_balanced.copy_(balanced)
        return coef_t

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the loaded buffers are the state now
