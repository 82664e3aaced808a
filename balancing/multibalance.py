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

`deferred_sync` (default off) hides the all-reduce latency where it blocks the host (gloo on
CPU; on GPUs NCCL already runs it on a stream without a host wait): step t combines its
gradients with the weights and scales computed from step t-1's global Gram, whose all-reduce
was started asynchronously in step t-1's backward. Weights stay identical on every rank; the
step uses one-step-old weights and norms (the first step after (re)start is exact).

`scale_by_tasks` (default on) passes M * sum_m lambda_m v_m on, so that lambda = lambda0 =
uniform without EMA reproduces the equal-weights gradient exactly and the shared layers'
effective learning rate matches the equal-weights baseline; off gives the paper's literal sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

import torch.distributed as dist

from balancing.base import GradientBalancer, combine, local_gram, world_size
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
    deferred_sync: bool = False


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


class MultiBalance(GradientBalancer):
    def __init__(self, num_tasks: int, cfg: MultiBalanceConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        prior = torch.tensor(cfg.prior, dtype=torch.float32) if cfg.prior else torch.full((num_tasks,), 1.0 / num_tasks)
        if prior.shape != (num_tasks,) or (prior < 0).any() or abs(float(prior.sum()) - 1) > 1e-5:
            raise ValueError(f"balancer.multibalance.prior must be {num_tasks} non-negative numbers summing to 1")
        self.register_buffer("prior", prior)
        self.register_buffer("ema_norm", torch.zeros(num_tasks))  # u [M]
        self.weights.copy_(prior)
        self._pending = None  # (async all-reduce work, its tensor) with deferred_sync

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        scale = self.num_tasks if self.cfg.scale_by_tasks else 1.0
        if self.cfg.deferred_sync and world_size() > 1:
            gram = self._deferred_gram(grads)
            if gram is None:  # the first step: nothing global yet; the current weights, raw gradients
                return combine(self.weights * scale, grads)
        else:
            gram = self.global_gram(grads)
        lam, u, s, n = multibalance_update(gram, self.weights, self.ema_norm, self.prior, self.cfg)
        coef = lam * s  # [M]
        self.weights.copy_(lam)
        self.ema_norm.copy_(u)
        self.grad_norm.copy_(n)
        self.grad_norm_balanced.copy_(coef * n)
        return combine(coef * scale, grads)  # [B, n']

    def _deferred_gram(self, grads: torch.Tensor) -> Optional[torch.Tensor]:
        """The previous step's global Gram (None at the first step); starts this step's."""
        previous = None
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            previous = tensor / world_size() ** 2
        local = local_gram(grads)
        self._pending = (dist.all_reduce(local, async_op=True), local)
        return previous
