"""The parameter-gradient family the MultiBalance paper argues against (its Table 2): task
weights from the gradients of the task losses w.r.t. the parameters of a shared module
(`module`: "cross" = the interaction module, "dense_arch" = the numerical module), which
costs one extra backward pass per task through the heads, the shared MLP and that module.

Each step: J [M, P] = the per-task gradients (torch.autograd.grad, graph retained; the
embedding tables are below the chosen module, so these passes never reach them), all-reduced
(mean over ranks: the global gradient), the weights from the Gram matrix J J^T, then the
single real backward of M * sum_m w_m L_m: the fused embedding optimizer still runs exactly
once per step.

- `param_mgda`: MGDA (Sener & Koltun 2018, eq. 3) on J, solved exactly (`min_norm_simplex`).
- `param_moco`: MoCo (Fernando et al. 2023, Algorithm 1): Y <- Y - beta (Y - J~) with J~ the
  unit-normalised gradients, lambda <- Proj(lambda - gamma (Y Y^T + rho I) lambda); the
  weights are applied to the losses (this trainer has one backward, so the chosen module
  gets sum lambda_m grad L_m rather than Y^T lambda).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from balancing.base import Balancer, world_size
from balancing.moco import MoCoConfig, moco_lambda
from balancing.weighting import EPS, min_norm_weights


@dataclass
class ParamConfig:
    module: str = "cross"  # cross | dense_arch | shared


@dataclass
class ParamMoCoConfig(MoCoConfig):
    module: str = "cross"


@torch.fx.wrap
def param_combine(losses: torch.Tensor, balancer: "ParamBalancer") -> torch.Tensor:
    # Wrapped for FX: autograd calls inside the model's forward must stay opaque to tracing.
    return balancer.weighted_loss(losses)


class ParamBalancer(Balancer):
    def __init__(self, num_tasks: int, cfg):
        super().__init__(num_tasks)
        self.cfg = cfg
        self.shared_params: List[nn.Parameter] = []  # a plain list: not registered twice
        self.register_buffer("grad_norm", torch.zeros(num_tasks))

    def attach(self, model: nn.Module) -> None:
        if not hasattr(model, self.cfg.module):
            raise ValueError(f"balancer: the model has no module {self.cfg.module!r}")
        self.shared_params = [p for p in getattr(model, self.cfg.module).parameters() if p.requires_grad]

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return param_combine(losses, self)

    def task_jacobian(self, losses: torch.Tensor) -> torch.Tensor:
        """[M, P]: the global (rank-mean) gradient of each task loss w.r.t. the shared params."""
        rows = []
        for m in range(self.num_tasks):
            grads = torch.autograd.grad(losses[m], self.shared_params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, self.shared_params)]))
        jac = torch.stack(rows)
        if world_size() > 1:
            dist.all_reduce(jac)
            jac /= world_size()
        return jac

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not losses.requires_grad:
            return losses.sum()  # evaluation: no balancing
        jac = self.task_jacobian(losses)
        self.grad_norm.copy_(jac.norm(dim=1))
        w = self.weights_from(jac)
        self.weights.copy_(w)
        return (w.detach() * self.num_tasks * losses).sum()

    def weights_from(self, jac: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self):
        return {"weight": self.weights, "grad_norm": self.grad_norm}


class ParamMGDA(ParamBalancer):
    def __init__(self, num_tasks: int, cfg: ParamConfig):
        super().__init__(num_tasks, cfg)
        self.weights.fill_(1.0 / num_tasks)

    def weights_from(self, jac: torch.Tensor) -> torch.Tensor:
        return min_norm_weights(jac @ jac.T, self.weights)


class ParamMoCo(ParamBalancer):
    def __init__(self, num_tasks: int, cfg: ParamMoCoConfig):
        super().__init__(num_tasks, cfg)
        self.weights.fill_(1.0 / num_tasks)
        # Y [M, P]: a buffer (checkpointed), sized when the module is known; `started` = 0 until
        # the first step sets it
        self.register_buffer("tracked", torch.zeros(num_tasks, 0))
        self.register_buffer("started", torch.zeros(()))

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        p = sum(q.numel() for q in self.shared_params)
        self.tracked = torch.zeros(self.num_tasks, p, device=self.weights.device)

    def weights_from(self, jac: torch.Tensor) -> torch.Tensor:
        n = jac.norm(dim=1, keepdim=True)
        unit = jac / n.clamp(min=EPS)
        if not bool(self.started):
            self.tracked.copy_(unit.detach())
            self.started.fill_(1)
        else:
            self.tracked -= self.cfg.beta * (self.tracked - unit.detach())
        return moco_lambda(self.tracked @ self.tracked.T, self.weights, n.squeeze(1) > 0, self.cfg)
