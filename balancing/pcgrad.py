"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS; Algorithm 1):
each task gradient is projected onto the normal plane of every other task gradient it
conflicts with (negative inner product), the others taken in random order; the projected
gradients are summed. Every projection keeps the gradient in the span of the original ones,
so it is tracked as coefficients over them and only needs the Gram matrix. The random order
comes from a generator seeded with (seed, step), identical on every rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from balancing.weighting import GramWeighting


@dataclass
class PCGradConfig:
    seed: int = 0


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class PCGrad(GramWeighting):
    def __init__(self, num_tasks: int, cfg: PCGradConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def gram_weights(self, gram: torch.Tensor) -> torch.Tensor:
        gen = step_generator(self.cfg.seed, int(self.step))
        self.step += 1
        return pcgrad_weights(gram.detach().cpu().double(), gen).to(gram.device, gram.dtype)


def pcgrad_weights(gram: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    m = gram.shape[0]
    weights = torch.zeros(m, dtype=gram.dtype)
    for i in range(m):
        perm = torch.randperm(m, generator=gen)
        c = torch.zeros(m, dtype=gram.dtype)  # g_i^PC = sum_k c_k g_k
        c[i] = 1.0
        for j in perm.tolist():
            if j == i:
                continue
            dot = gram[j] @ c  # <g_i^PC, g_j>
            if dot < 0 and gram[j, j] > 0:
                c[j] -= dot / gram[j, j]
        weights += c
    return weights
