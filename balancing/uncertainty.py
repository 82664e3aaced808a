"""Uncertainty weighting (Kendall et al. 2018, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR; eq. 7 in the log-variance form of LibMTL):
    L = sum_m L_m / (2 exp(s_m)) + s_m / 2,    s_m = log sigma_m^2 learned with the model.
The s_m are parameters of the dense part, so data parallelism keeps them identical on every
rank; the logged weight is 1 / (2 exp(s_m))."""
from __future__ import annotations

import torch
from torch import nn

from balancing.base import Balancer, NoConfig


class Uncertainty(Balancer):
    def __init__(self, num_tasks: int, cfg: NoConfig | None = None):
        super().__init__(num_tasks)
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return (0.5 * torch.exp(-self.log_var) * losses + 0.5 * self.log_var).sum()

    def stats(self):
        return {"weight": 0.5 * torch.exp(-self.log_var.detach())}
