"""Task balancers. `REGISTRY` maps a method name to (class, config class); the trainer
builds whichever `balancer.method` names, with its config from `[balancer.<method>]`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple, Type

from balancing.base import Balancer, GradientBalancer, NoConfig
from balancing.equal import EqualWeights
from balancing.fixed import FixedConfig, FixedWeights
from balancing.multibalance import MultiBalance, MultiBalanceConfig

REGISTRY: Dict[str, Tuple[Type[Balancer], Type[Any]]] = {
    "equal": (EqualWeights, NoConfig),
    "fixed": (FixedWeights, FixedConfig),
    "multibalance": (MultiBalance, MultiBalanceConfig),
}


@dataclass
class BalancerConfig:
    method: str = "equal"
    fixed: FixedConfig = field(default_factory=FixedConfig)
    multibalance: MultiBalanceConfig = field(default_factory=MultiBalanceConfig)

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise ValueError(f"balancer.method {self.method!r} unknown; choose from {sorted(REGISTRY)}")


def build_balancer(cfg: BalancerConfig, num_tasks: int) -> Balancer:
    cls, _ = REGISTRY[cfg.method]
    return cls(num_tasks, getattr(cfg, cfg.method, NoConfig()))
