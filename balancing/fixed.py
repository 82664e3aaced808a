"""Fixed, hand-set loss weights: sum_m w_m L_m."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from balancing.base import Balancer


@dataclass
class FixedConfig:
    weights: List[float] = field(default_factory=list)  # one per task


class FixedWeights(Balancer):
    def __init__(self, num_tasks: int, cfg: FixedConfig):
        super().__init__(num_tasks)
        if len(cfg.weights) != num_tasks:
            raise ValueError(f"balancer.fixed.weights has {len(cfg.weights)} values for {num_tasks} tasks")
        self.weights.copy_(torch.tensor(cfg.weights, dtype=torch.float32))
