"""MGDA-UB (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS; Section 3.3): the min-norm point of the convex hull of the task gradients w.r.t. the
shared representation, min_{a in simplex} ||sum_m a_m g_m||^2 (their eq. 3 with Z instead of
the shared parameters), solved exactly for small M (see `min_norm_simplex`)."""
from __future__ import annotations

import torch

from balancing.base import NoConfig
from balancing.weighting import GramWeighting, min_norm_weights


class MGDA(GramWeighting):
    on_simplex = True

    def __init__(self, num_tasks: int, cfg: NoConfig | None = None):
        super().__init__(num_tasks)

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        return min_norm_weights(gram, self.weights)
