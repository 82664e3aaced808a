"""The training module that DMP wraps: model + balancer + per-task losses."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from balancing.base import Balancer
from data.batch import Batch
from models.mtl import MultiTaskDCN
from trainer.precision import autocast_region


NORMALIZATIONS = ("batch", "labelled")


def masked_task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                       normalization: str = "batch", regression: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-task loss summed over the rows labelled for that task, each row scaled by its weight
    (`mask`). logits/labels/mask [B, M] -> [M]. Binary tasks: BCE on the logit; regression tasks
    (`regression` [M] bool): the squared error of the output.

    normalization "batch": divided by the batch size B, so every impression weighs the same
    and a sparsely labelled task (CVR: clicked rows only) has a proportionally smaller loss
    and gradient, as in production ranking models; "labelled": the weighted mean over the
    task's labelled rows. A task with no labelled row gets loss 0 and zero gradient either way
    (the weight sum is clamped to 1, never a 0/0)."""
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B, M]
    if regression is not None and bool(regression.any()):
        per_row = torch.where(regression, (logits - labels) ** 2, per_row)
    total = (per_row * mask).sum(0)  # [M]
    if normalization == "labelled":
        return total / mask.sum(0).clamp(min=1.0)
    return total / logits.shape[0]  # B >= 1: padding batches have one row


class MultiTaskTrain(nn.Module):
    def __init__(self, model: MultiTaskDCN, balancer: Balancer, loss_normalization: str = "batch",
                 autocast_dtype: Optional[torch.dtype] = None, device_type: str = "cpu",
                 regression: Sequence[bool] = ()):
        super().__init__()
        # [M] bool: tasks whose output is a value (squared error), not a logit (BCE)
        self.register_buffer("regression", torch.tensor(list(regression) or [False] * balancer.num_tasks,
                                                        device=balancer.weights.device), persistent=False)
        # autocast per forward (never around a whole loop: see trainer.precision)
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        if loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"trainer.loss_normalization must be one of {NORMALIZATIONS}")
        self.model = model
        self.balancer = balancer
        balancer.attach(model)
        self.loss_normalization = loss_normalization

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        with autocast_region(self.device_type, self.autocast_dtype):
            h = self.model.representation(batch.dense_features, batch.sparse_features)  # [B, n']
            logits = self.model.task_logits(self.balancer(h))  # [B, M]
        logits = logits.float()  # losses and predictions in fp32
        losses = masked_task_losses(logits, batch.labels, batch.label_mask, self.loss_normalization,
                                    self.regression)  # [M]
        loss = self.balancer.combine_losses(losses)
        out = logits.detach()
        preds = torch.where(self.regression, out, torch.sigmoid(out))  # [B, M]: probabilities, or values
        return loss, (losses.detach(), preds, batch.labels, batch.label_mask)
