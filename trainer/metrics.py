"""Per-task NE (the paper's metric) and AUC over the whole eval set, across all ranks, with
torchrec.metrics. Rows not labelled for a task get weight 0 for that task.

Two things torchrec leaves to the caller:
- AUC keeps a window of ceil(window_size / world) rows per rank and drops a rank's oldest rows
  beyond it; the window is sized so that the fullest rank's rows (padding rows included) fit,
  so AUC is computed on every eval row whatever the split (an uneven split, or an eval set
  smaller than world x batch).
- A task without positives, without negatives or without labelled rows has no NE (its label
  entropy is 0) and no AUC: it reports None (null in summary.json) and a warning, not 1e11.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric

log = logging.getLogger(__name__)


def window_size(world_size: int, batch_size: int, max_rank_rows: int, steps: int) -> int:
    """The global window: every rank's local window, ceil(window / world), holds the fullest
    rank's rows plus one padding row per step, and is at least one batch (torchrec's check)."""
    return world_size * (max(max_rank_rows + steps, batch_size) + 1)


class Evaluator:
    def __init__(self, tasks: List[str], world_size: int, rank: int, batch_size: int,
                 max_rank_rows: int, steps: int, device: torch.device):
        infos = [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
        common = dict(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=infos,
                      compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
                      window_size=window_size(world_size, batch_size, max_rank_rows, steps),
                      compute_on_all_ranks=True)
        self.tasks = tasks
        self.ne = NEMetric(**common).to(device)
        self.auc = AUCMetric(**common).to(device)
        self.counts = torch.zeros(2, len(tasks), dtype=torch.float64, device=device)  # [labelled, positive] x M

    def update(self, probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """probs/labels/mask [B, M]."""
        preds = {t: probs[:, m] for m, t in enumerate(self.tasks)}
        labs = {t: labels[:, m] for m, t in enumerate(self.tasks)}
        weights = {t: mask[:, m] for m, t in enumerate(self.tasks)}
        for metric in (self.ne, self.auc):
            metric.update(predictions=preds, labels=labs, weights=weights)
        self.counts += torch.stack([mask.sum(0), (labels * mask).sum(0)]).double()

    def compute(self) -> Dict[str, Dict[str, Optional[float]]]:
        """{task: {"ne": ..., "auc": ..., "rows": ..., "positives": ...}}, identical on every
        rank; ne and auc are None for a task whose eval labels are all one class (or absent)."""
        ne, auc = self.ne.compute(), self.auc.compute()
        counts = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        out = {}
        for m, t in enumerate(self.tasks):
            rows, pos = int(counts[0, m]), int(counts[1, m])
            defined = 0 < pos < rows
            if not defined:
                log.warning("eval: task %r has %d labelled rows, %d positive: NE and AUC are undefined "
                            "(reported as null)", t, rows, pos)
            out[t] = {"ne": float(ne[f"ne-{t}|lifetime_ne"]) if defined else None,
                      "auc": float(auc[f"auc-{t}|window_auc"]) if defined else None,
                      "rows": rows, "positives": pos}
        return out
