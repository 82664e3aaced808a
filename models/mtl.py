"""Multi-task DCN-v2 ranking model (the paper's Figure 1 layout).

    sparse ids  -> EmbeddingBagCollection (categorical module)   [B, F * d]
    dense       -> MLP (numerical module)                        [B, n_dense]
    concat      -> DCN-v2 low-rank cross network (interaction)   [B, F * d + n_dense]
                -> shared MLP -> shared representation h          [B, n']
    h_m (one copy of h per task, from the balancer's fan-out) -> head m -> logit m   [B]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])  # numerical module
    cross_layers: int = 2
    cross_low_rank: int = 32
    shared_arch: List[int] = field(default_factory=lambda: [128, 32])  # last = n'
    head_arch: List[int] = field(default_factory=lambda: [32])  # hidden sizes of each head
    embedding_precision: str = "fp32"  # "fp32" or "fp16" table weights


PRECISIONS = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def build_ebc(tables: Sequence[tuple], dim: int, device: torch.device,
              precision: str = "fp32") -> EmbeddingBagCollection:
    """tables: (feature name, num_embeddings); one table per feature, sum pooling."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.embedding_precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=rows,
                                   feature_names=[name], pooling=PoolingType.SUM,
                                   data_type=PRECISIONS[precision])
                for name, rows in tables],
        device=device,
    )


class Head(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], device: Optional[torch.device]):
        super().__init__()
        self.mlp = MLP(in_features, list(hidden), device=device) if hidden else nn.Identity()
        self.out = nn.Linear(hidden[-1] if hidden else in_features, 1, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(h)).squeeze(-1)  # [B]


class MultiTaskDCN(nn.Module):
    """`ebc` is passed in built (the trainer builds it on the meta device for sharding);
    the dense parts are built on `device`."""

    def __init__(self, ebc: EmbeddingBagCollection, num_dense: int, num_tasks: int,
                 cfg: ModelConfig, device: Optional[torch.device] = None):
        super().__init__()
        self.ebc = ebc
        self.num_sparse = len(ebc.embedding_bag_configs())
        self.dense_arch = MLP(num_dense, cfg.dense_arch, device=device)
        cross_in = self.num_sparse * cfg.embedding_dim + cfg.dense_arch[-1]
        self.cross = LowRankCrossNet(cross_in, cfg.cross_layers, cfg.cross_low_rank)
        self.shared = MLP(cross_in, cfg.shared_arch, device=device)
        self.heads = nn.ModuleList(Head(cfg.shared_arch[-1], cfg.head_arch, device) for _ in range(num_tasks))
        self.cross.to(device)  # LowRankCrossNet takes no device argument
        self.representation_dim = cfg.shared_arch[-1]

    def representation(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.ebc(sparse).values()  # [B, F * d]
        x = torch.cat([emb, self.dense_arch(dense)], dim=1)  # [B, F * d + n_dense]
        return self.shared(self.cross(x))  # [B, n']

    def task_logits(self, hs: List[torch.Tensor]) -> torch.Tensor:
        """hs: one [B, n'] input per head (copies of h) -> logits [B, M]."""
        # indexed rather than zipped: the train pipeline's FX tracer may hand us a Proxy
        return torch.stack([head(hs[m]) for m, head in enumerate(self.heads)], dim=1)
