"""Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR; Algorithm 1): for each task i
and each other task j (random order), if cos(g_i^PC, g_j) is below the EMA target phi_ij, add
the multiple of g_j that raises it to the target:
    g_i += ||g_i|| (phi_ij sqrt(1 - c^2) - c sqrt(1 - phi_ij^2)) / (||g_j|| sqrt(1 - phi_ij^2)) g_j
then phi_ij <- (1 - beta) phi_ij + beta c. Tracked as coefficients over the original
gradients (Gram only); the targets phi [M, M] are a buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from balancing.pcgrad import step_generator
from balancing.weighting import GramWeighting


@dataclass
class GradVacConfig:
    beta: float = 0.01  # EMA rate of the similarity targets (paper: 1e-2)
    eps: float = 1e-8
    seed: int = 0


class GradVac(GramWeighting):
    def __init__(self, num_tasks: int, cfg: GradVacConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("phi", torch.zeros(num_tasks, num_tasks))  # EMA targets

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        gen = step_generator(self.cfg.seed, int(self.step))
        self.step += 1
        phi = self.phi.detach().cpu().double()
        w = gradvac_weights(gram.detach().cpu().double(), phi, self.cfg.beta, self.cfg.eps, gen)
        self.phi.copy_(phi)
        return w.to(gram.device, gram.dtype)


def gradvac_weights(gram: torch.Tensor, phi: torch.Tensor, beta: float, eps: float,
                    gen: torch.Generator) -> torch.Tensor:
    """Updates phi in place; returns the weights [M] (sum of the coefficient rows)."""
    m = gram.shape[0]
    coef = torch.eye(m, dtype=gram.dtype)
    for i in range(m):
        cg = coef[i] @ gram  # <g_i^PC, g_j> for every j
        others = [j for j in range(m) if j != i]
        for k in torch.randperm(len(others), generator=gen).tolist():
            j = others[k]
            if gram[j, j] <= 0 or gram[i, i] <= 0:
                continue  # a task without labels: nothing to align
            norm_i = (cg * coef[i]).sum().clamp(min=0).sqrt()
            norm_j = gram[j, j].clamp(min=0).sqrt()
            cos = cg[j] / (norm_i * norm_j + eps)
            target = phi[i, j]
            if cos < target:
                s1, s2 = (1 - cos**2).clamp(min=0).sqrt(), (1 - target**2).clamp(min=0).sqrt()
                w = norm_i * (target * s1 - cos * s2) / (norm_j * s2 + eps)
                coef[i, j] += w
                cg = cg + w * gram[j]
            phi[i, j] = (1 - beta) * target + beta * cos
    return coef.sum(0)
