"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR; Section 3.2):
weights a such that the combined gradient g = sum a_m g_m has equal projections onto every
task's unit gradient u_m = g_m / ||g_m||, with sum a = 1. In Gram form (the closed form of
their eq. 8, as torchjd writes it): a proportional to G^+ n, n = sqrt(diag G), normalised to
sum 1."""
from __future__ import annotations

import torch

from balancing.base import NoConfig
from balancing.weighting import EPS, GramWeighting


class IMTLG(GramWeighting):
    on_simplex = True  # the weights sum to 1 (they may be negative)

    def __init__(self, num_tasks: int, cfg: NoConfig | None = None):
        super().__init__(num_tasks)

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        n = gram.diagonal().clamp(min=0).sqrt()
        v = torch.linalg.pinv(gram) @ n  # [M]
        s = v.sum()
        return torch.where(s.abs() > EPS, v / torch.where(s.abs() > EPS, s, torch.ones_like(s)), torch.zeros_like(v))
