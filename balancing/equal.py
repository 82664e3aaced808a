"""Equal weights: the sum of the task losses (the baseline every table compares against)."""
from __future__ import annotations

from balancing.base import Balancer, NoConfig


class EqualWeights(Balancer):
    def __init__(self, num_tasks: int, cfg: NoConfig | None = None):
        super().__init__(num_tasks)
