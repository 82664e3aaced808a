"""The training module that DMP wraps: model + balancer + per-task losses."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from balancing.base import Balancer
from data.batch import Batch
from models.mtl import MultiTaskDCN


def masked_task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-task mean BCE over the rows labelled for that task. logits/labels/mask [B, M] -> [M].

    A task with no labelled row gets loss 0 and zero gradient (the count is clamped to 1,
    never a 0/0)."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B, M]
    return (bce * mask).sum(0) / mask.sum(0).clamp(min=1.0)


class MultiTaskTrain(nn.Module):
    def __init__(self, model: MultiTaskDCN, balancer: Balancer):
        super().__init__()
        self.model = model
        self.balancer = balancer

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        h = self.model.representation(batch.dense_features, batch.sparse_features)  # [B, n']
        logits = self.model.task_logits(self.balancer(h))  # [B, M]
        losses = masked_task_losses(logits, batch.labels, batch.label_mask)  # [M]
        loss = self.balancer.combine_losses(losses)
        return loss, (losses.detach(), torch.sigmoid(logits.detach()), batch.labels, batch.label_mask)
