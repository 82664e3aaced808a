"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR; Section 3.2):
weights a such that the combined gradient g = sum a_m g_m has equal projections onto every
task's unit gradient u_m = g_m / ||g_m||, with sum a = 1. In Gram form (the closed form of
their eq. 8, as torchjd writes it): a proportional to G^+ n, n = sqrt(diag G), normalised to
sum 1. Tasks without a gradient in the batch get weight 0."""
from __future__ import annotations

import torch

from balancing.base import NoConfig
from balancing.weighting import EPS, GramWeighting, solve_small


class IMTLG(GramWeighting):
    on_simplex = True  # the weights sum to 1 (they may be negative)

    def __init__(self, num_tasks: int, cfg: NoConfig | None = None):
        super().__init__(num_tasks)

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        g = gram.detach().to("cpu", torch.float64)
        n = g.diagonal().clamp(min=0).sqrt()
        active = (n > 0).tolist()
        idx = [i for i, a in enumerate(active) if a]
        # G v = n on the tasks with a gradient (G^+ n when G is invertible there); solved in
        # Python floats so that every rank gets bit-identical weights (see solve_small)
        v = solve_small([[float(g[i, j]) for j in idx] for i in idx], [float(n[i]) for i in idx]) if idx else None
        w = torch.zeros_like(n)
        if v is not None and abs(sum(v)) > EPS:
            w[idx] = torch.tensor(v, dtype=torch.float64) / sum(v)
        elif idx:  # singular (e.g. identical gradients): the pseudo-inverse's least-norm answer
            p = torch.linalg.pinv(g[idx][:, idx]) @ n[idx]
            w[idx] = p / p.sum() if abs(float(p.sum())) > EPS else p * 0
        return w.to(gram.device, gram.dtype)
