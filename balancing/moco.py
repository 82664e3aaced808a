"""MoCo (Fernando et al. 2023, "Mitigating Gradient Bias in Multi-objective Learning: A
Provably Convergent Approach", ICLR; Algorithm 1) on the shared representation:
    Y <- Y - beta (Y - G~)                        (gradient tracking)
    lambda <- Proj_simplex(lambda - gamma (Y Y^T + rho I) lambda)
with unit-normalised task gradients g~_m = g_m / ||g_m||. On the representation, gradient
rows belong to different samples at each step, so what is tracked is the Gram matrix
Q ~ Y Y^T (Q <- Q - beta (Q - G~)) and the combined gradient is sum_m lambda_m g_m of the
current step. The parameter-gradient MoCo (`param_moco`) tracks the true Y."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from balancing.simplex import project_simplex
from balancing.weighting import EPS, GramWeighting


@dataclass
class MoCoConfig:
    beta: float = 0.5  # tracking rate
    gamma: float = 0.1  # weight step size
    rho: float = 0.0  # regulariser


def moco_lambda(q: torch.Tensor, lam: torch.Tensor, active: torch.Tensor, cfg: MoCoConfig) -> torch.Tensor:
    step = (q + cfg.rho * torch.eye(q.shape[0], dtype=q.dtype, device=q.device)) @ lam
    return project_simplex(lam - cfg.gamma * step, active, lam)


class MoCo(GramWeighting):
    on_simplex = True

    def __init__(self, num_tasks: int, cfg: MoCoConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        self.weights.fill_(1.0 / num_tasks)
        self.register_buffer("tracked_gram", torch.zeros(num_tasks, num_tasks))  # Q
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        n = gram.diagonal().clamp(min=0).sqrt()
        active = n > 0
        inv = torch.where(active, 1 / n.clamp(min=EPS), torch.zeros_like(n))
        unit = inv[:, None] * gram * inv[None, :]  # [M, M] Gram of the unit gradients
        q = torch.where(self.started, self.tracked_gram - self.cfg.beta * (self.tracked_gram - unit), unit)
        self.tracked_gram.copy_(q)
        self.started.fill_(True)
        return moco_lambda(q, self.weights, active, self.cfg)
