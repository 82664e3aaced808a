"""Per-task NE (the paper's metric) and AUC over the whole eval set, across all ranks, with
torchrec.metrics. Rows not labelled for a task get weight 0 for that task."""
from __future__ import annotations

from typing import Dict, List

import torch
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric


class Evaluator:
    def __init__(self, tasks: List[str], world_size: int, rank: int, batch_size: int,
                 max_rows: int, device: torch.device):
        infos = [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
        common = dict(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=infos,
                      compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
                      window_size=max(max_rows, batch_size), compute_on_all_ranks=True)
        self.tasks = tasks
        # AUC's window must hold the whole eval set: it is sized from the eval rows.
        self.ne = NEMetric(**common).to(device)
        self.auc = AUCMetric(**common).to(device)

    def update(self, probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """probs/labels/mask [B, M]."""
        preds = {t: probs[:, m] for m, t in enumerate(self.tasks)}
        labs = {t: labels[:, m] for m, t in enumerate(self.tasks)}
        weights = {t: mask[:, m] for m, t in enumerate(self.tasks)}
        for metric in (self.ne, self.auc):
            metric.update(predictions=preds, labels=labs, weights=weights)

    def compute(self) -> Dict[str, Dict[str, float]]:
        """{task: {"ne": ..., "auc": ...}}, identical on every rank."""
        ne, auc = self.ne.compute(), self.auc.compute()
        return {t: {"ne": float(ne[f"ne-{t}|lifetime_ne"]), "auc": float(auc[f"auc-{t}|window_auc"])}
                for t in self.tasks}
