"""Gradient Drop (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS; Algorithm 1, with leak 0), applied to the shared
representation as in the paper: per element, the sign purity P = 1/2 (1 + sum_m g_m /
sum_m |g_m|); with U ~ Uniform(0, 1) per element, task m keeps its gradient where
(P > U and g_m > 0) or (P < U and g_m < 0); the kept gradients are summed.

Element-wise: under data parallelism each element of h lives on exactly one rank, so the
local computation is the global one. The uniforms come from a generator seeded with
(seed, step, rank). There are no task weights: `weight` logs the fraction of each task's
gradient norm that was kept."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from balancing.base import GradientBalancer


@dataclass
class GradDropConfig:
    seed: int = 0


def graddrop_combine(grads: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """grads [M, ...], u [...] uniforms -> combined [...]."""
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0).clamp(min=1e-30))
    keep = ((purity > u) & (grads > 0)) | ((purity < u) & (grads < 0))  # [M, ...]
    return (grads * keep).sum(0)


class GradDrop(GradientBalancer):
    def __init__(self, num_tasks: int, cfg: GradDropConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        gen = torch.Generator(device=grads.device).manual_seed(
            (self.cfg.seed * 1_000_003 + int(self.step)) * 4099 + rank)
        self.step += 1
        u = torch.rand(grads.shape[1:], generator=gen, device=grads.device, dtype=grads.dtype)
        out = graddrop_combine(grads, u)
        n = grads.reshape(grads.shape[0], -1).norm(dim=1)
        self.grad_norm.copy_(n)
        self.weights.copy_(torch.ones_like(n))
        return out
