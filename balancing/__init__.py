"""Task balancers. `REGISTRY` maps a method name to (class, config class); the trainer
builds whichever `balancer.method` names, with its config from `[balancer.<method>]`.

On the shared representation (inside the single backward pass): equal, fixed, uncertainty,
pcgrad, gradvac, graddrop, dbmtl, imtlg, mgda, moco, multibalance (EMA on/off is its `ema`).
On the parameters of a shared module (one extra backward per task): param_mgda, param_moco.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple, Type

from balancing.base import Balancer, NoConfig
from balancing.dbmtl import DBMTL, DBMTLConfig
from balancing.equal import EqualWeights
from balancing.fixed import FixedConfig, FixedWeights
from balancing.graddrop import GradDrop, GradDropConfig
from balancing.gradvac import GradVac, GradVacConfig
from balancing.imtl import IMTLG
from balancing.mgda import MGDA
from balancing.moco import MoCo, MoCoConfig
from balancing.multibalance import MultiBalance, MultiBalanceConfig
from balancing.param import ParamConfig, ParamMGDA, ParamMoCo, ParamMoCoConfig
from balancing.pcgrad import PCGrad, PCGradConfig
from balancing.uncertainty import Uncertainty

REGISTRY: Dict[str, Tuple[Type[Balancer], Type[Any]]] = {
    "equal": (EqualWeights, NoConfig),
    "fixed": (FixedWeights, FixedConfig),
    "uncertainty": (Uncertainty, NoConfig),
    "pcgrad": (PCGrad, PCGradConfig),
    "gradvac": (GradVac, GradVacConfig),
    "graddrop": (GradDrop, GradDropConfig),
    "dbmtl": (DBMTL, DBMTLConfig),
    "imtlg": (IMTLG, NoConfig),
    "mgda": (MGDA, NoConfig),
    "moco": (MoCo, MoCoConfig),
    "multibalance": (MultiBalance, MultiBalanceConfig),
    "param_mgda": (ParamMGDA, ParamConfig),
    "param_moco": (ParamMoCo, ParamMoCoConfig),
}


@dataclass
class BalancerConfig:
    method: str = "equal"
    fixed: FixedConfig = field(default_factory=FixedConfig)
    pcgrad: PCGradConfig = field(default_factory=PCGradConfig)
    gradvac: GradVacConfig = field(default_factory=GradVacConfig)
    graddrop: GradDropConfig = field(default_factory=GradDropConfig)
    dbmtl: DBMTLConfig = field(default_factory=DBMTLConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    multibalance: MultiBalanceConfig = field(default_factory=MultiBalanceConfig)
    param_mgda: ParamConfig = field(default_factory=ParamConfig)
    param_moco: ParamMoCoConfig = field(default_factory=ParamMoCoConfig)

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise ValueError(f"balancer.method {self.method!r} unknown; choose from {sorted(REGISTRY)}")


def build_balancer(cfg: BalancerConfig, num_tasks: int) -> Balancer:
    cls, _ = REGISTRY[cfg.method]
    return cls(num_tasks, getattr(cfg, cfg.method, NoConfig()))
