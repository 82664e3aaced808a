"""DB-MTL (Lin et al. 2023, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029;
Algorithm 1) with the median target: loss-scale balancing trains on log(L_m) (so task m's
gradient is g_m / L_m), and gradient-magnitude balancing rescales every task's gradient to
the same norm, here the median of the task norms (the paper's default is the maximum):
    combined = sum_m (median_k ||g~_k|| / ||g~_m||) g~_m,   g~_m = grad log L_m.
The paper's EMA of gradients is not used: on the representation, gradient rows belong to
different samples at each step. Norms come from the all-reduced Gram matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from balancing.weighting import EPS, GramWeighting


@dataclass
class DBMTLConfig:
    target: str = "median"  # median | max
    log_eps: float = 1e-8


class DBMTL(GramWeighting):
    def __init__(self, num_tasks: int, cfg: DBMTLConfig):
        super().__init__(num_tasks)
        if cfg.target not in ("median", "max"):
            raise ValueError("balancer.dbmtl.target must be 'median' or 'max'")
        self.cfg = cfg

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        # log-loss: task m's gradient reaching the fan-out is g_m / L_m
        return torch.log(losses + self.cfg.log_eps).sum()

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        n = gram.diagonal().clamp(min=0).sqrt()  # [M]
        active = n > 0
        if self.cfg.target == "max":
            target = n.max()
        else:  # median of the active tasks' norms (lower median for an even count)
            vals = torch.where(active, n, torch.full_like(n, float("inf"))).sort().values
            count = active.sum().clamp(min=1)
            target = vals.gather(0, ((count - 1) // 2).view(1)).squeeze(0)
            target = torch.where(active.any(), target, torch.zeros_like(target))
        return torch.where(active, target / n.clamp(min=EPS), torch.zeros_like(n))
