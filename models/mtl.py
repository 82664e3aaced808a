"""Multi-task DCN-v2 ranking model (the paper's Figure 1 layout).

    sparse ids  -> EmbeddingBagCollection (categorical module)   [B, F * d]  (sum of dims: d per table)
    dense       -> MLP (numerical module)                        [B, n_dense]
    concat      -> DCN-v2 low-rank cross network (interaction)   [B, F * d + n_dense]
                -> shared MLP -> shared representation h          [B, n']
    h_m (one copy of h per task, from the balancer's fan-out)      [M, B, n']
                -> head m -> logit m (the M heads as batched matmuls)  [B, M]
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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])  # numerical module
    cross_layers: int = 2
    cross_low_rank: int = 32
    shared_arch: List[int] = field(default_factory=lambda: [128, 32])  # last = n'
    head_arch: List[int] = field(default_factory=lambda: [32])  # hidden sizes of each head
    embedding_precision: str = "fp32"  # "fp32" or "fp16" table weights
    # each head's output bias at a fresh start: "base_rate" (logit of a binary task's training
    # positive rate, a regression task's label mean: the model starts at the constant predictor
    # with the lowest loss, not at p = 0.5), "zero", or "uniform" (nn.Linear's init)
    head_bias_init: str = "base_rate"

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"model.embedding_dim {self.embedding_dim} must be a positive multiple of 4 "
                             f"(FBGEMM's embedding kernels need one)")
        if self.head_bias_init not in HEAD_BIAS_INITS:
            raise ValueError(f"model.head_bias_init must be one of {HEAD_BIAS_INITS}, got {self.head_bias_init!r}")
        if not self.shared_arch or not self.dense_arch:
            raise ValueError("model.shared_arch and model.dense_arch need at least one layer each")


HEAD_BIAS_INITS = ("base_rate", "zero", "uniform")
PRECISIONS = {"fp32": DataType.FP32, "fp16": DataType.FP16}


POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def build_ebc(tables: Sequence, dim: int, device: torch.device,
              precision: str = "fp32") -> EmbeddingBagCollection:
    """tables: `data.schema.TableSpec`s (name, num_embeddings, dim (0: `dim`), pooling, features)."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.embedding_precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{t.name}", embedding_dim=t.dim or dim, num_embeddings=t.num_embeddings,
                                   feature_names=list(t.features), pooling=POOLINGS[t.pooling],
                                   data_type=PRECISIONS[precision])
                for t in tables],
        device=device,
    )


class BatchedLinear(nn.Module):
    """M independent linear layers applied as one batched matmul: x [M, B, in] -> [M, B, out].
    Initialised like M `nn.Linear`s (uniform in +-1/sqrt(in))."""

    def __init__(self, num: int, in_features: int, out_features: int, device: Optional[torch.device]):
        super().__init__()
        bound = in_features ** -0.5
        self.weight = nn.Parameter(torch.empty(num, in_features, out_features, device=device).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_features, device=device).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TaskHeads(nn.Module):
    """The M task heads (ReLU MLPs of the same shape, one logit each), run together: a few
    batched matmuls instead of M small MLPs, and the balancer's fan-out hands over its M copies
    of h as one [M, B, n'] tensor, whose gradient comes back as one [M, B, n'] tensor."""

    def __init__(self, num_tasks: int, in_features: int, hidden: Sequence[int], device: Optional[torch.device]):
        super().__init__()
        sizes = [in_features, *hidden, 1]
        self.layers = nn.ModuleList(BatchedLinear(num_tasks, i, o, device) for i, o in zip(sizes, sizes[1:]))

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """bias [M]: each head's output (logit) bias."""
        self.layers[-1].bias.copy_(bias.reshape(-1, 1, 1).to(self.layers[-1].bias))

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        """hs [M, B, n'] -> logits [B, M]."""
        *hidden, out = self.layers
        x = hs
        for layer in hidden:
            x = torch.relu(layer(x))
        return out(x).squeeze(-1).T


class MultiTaskDCN(nn.Module):
    """`ebc` is passed in built (the trainer builds it on the meta device for sharding);
    the dense parts are built on `device`."""

    def __init__(self, ebc: EmbeddingBagCollection, num_dense: int, num_tasks: int,
                 cfg: ModelConfig, device: Optional[torch.device] = None):
        super().__init__()
        self.ebc = ebc
        # the features' order in the dense layers' input: the tables' order, whatever the plan
        self.emb_order = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]
        # [B, sum of the features' dims]: a shared table's dim once per feature that looks it up
        emb_dim = sum(t.embedding_dim * len(t.feature_names) for t in ebc.embedding_bag_configs())
        self.dense_arch = MLP(num_dense, cfg.dense_arch, device=device)
        cross_in = emb_dim + cfg.dense_arch[-1]
        self.cross = LowRankCrossNet(cross_in, cfg.cross_layers, cfg.cross_low_rank)
        self.shared = MLP(cross_in, cfg.shared_arch, device=device)
        self.heads = TaskHeads(num_tasks, cfg.shared_arch[-1], cfg.head_arch, device)
        self.cross.to(device)  # LowRankCrossNet takes no device argument
        self.representation_dim = cfg.shared_arch[-1]

    def representation(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        # A sharded EBC returns its features grouped by the rank that holds them, an order that
        # depends on the sharding plan: regrouped, a model means the same on any world size.
        emb = KeyedTensor.regroup([self.ebc(sparse)], [self.emb_order])[0]  # [B, F * d], table order
        return self.interaction(emb, dense)

    def interaction(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """emb [B, F * d] (the features' pooled embeddings in `emb_order`), dense [B, D] -> [B, n']."""
        x = torch.cat([emb, self.dense_arch(dense)], dim=1)  # [B, F * d + n_dense]
        return self.shared(self.cross(x))  # [B, n']

    def task_logits(self, hs: torch.Tensor) -> torch.Tensor:
        """hs [M, B, n']: one copy of h per head (from the balancer's fan-out) -> logits [B, M]."""
        return self.heads(hs)
