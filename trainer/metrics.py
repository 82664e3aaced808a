"""Per-task metrics over the whole eval set, across all ranks, with torchrec.metrics: NE (the
paper's metric) and AUC for binary tasks, MSE and MAE for regression tasks. Each row counts
with its weight for the task (0 where unlabelled; a task's weight column where it has one).

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
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.mae import MAEMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

log = logging.getLogger(__name__)


def window_size(world_size: int, batch_size: int, max_rank_rows: int, steps: int) -> int:
    """The global window: every rank's local window, ceil(window / world), holds the fullest
    rank's rows plus one padding row per step, and is at least one batch (torchrec's check)."""
    return world_size * (max(max_rank_rows + steps, batch_size) + 1)


class Evaluator:
    def __init__(self, tasks: List[str], world_size: int, rank: int, batch_size: int,
                 max_rank_rows: int, steps: int, device: torch.device, regression: Sequence[bool] = ()):
        self.tasks = tasks
        self.regression = list(regression) or [False] * len(tasks)
        self.binary = [t for t, r in zip(tasks, self.regression) if not r]
        self.valued = [t for t, r in zip(tasks, self.regression) if r]
        common = dict(world_size=world_size, my_rank=rank, batch_size=batch_size,
                      compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
                      window_size=window_size(world_size, batch_size, max_rank_rows, steps),
                      compute_on_all_ranks=True)
        self.metrics = [(cls(**common, tasks=_infos(group)).to(device), group) for cls, group in (
            (NEMetric, self.binary), (AUCMetric, self.binary), (MSEMetric, self.valued), (MAEMetric, self.valued))
            if group]
        self.counts = torch.zeros(2, len(tasks), dtype=torch.float64, device=device)  # [labelled, positive] x M

    def update(self, preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """preds (probabilities, or values for regression tasks) / labels / weights [B, M]."""
        col = {t: m for m, t in enumerate(self.tasks)}
        for metric, group in self.metrics:
            metric.update(predictions={t: preds[:, col[t]] for t in group},
                          labels={t: labels[:, col[t]] for t in group},
                          weights={t: weights[:, col[t]] for t in group})
        labelled = (weights > 0).double()
        self.counts += torch.stack([labelled.sum(0), ((labels > 0) * labelled).sum(0)])

    def compute(self) -> Dict[str, Dict[str, Optional[float]]]:
        """{task: {"ne", "auc" (binary) or "mse", "mae" (regression), "rows", "positives"}},
        identical on every rank; ne and auc are None for a task whose eval labels are all one
        class (or absent), mse and mae None for a task without labelled rows."""
        values: Dict[str, float] = {}
        for metric, _ in self.metrics:
            values.update({k: float(v) for k, v in metric.compute().items()})
        counts = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        out = {}
        for m, t in enumerate(self.tasks):
            rows, pos = int(counts[0, m]), int(counts[1, m])
            if self.regression[m]:
                defined = rows > 0
                out[t] = {"mse": values[f"mse-{t}|lifetime_mse"] if defined else None,
                          "mae": values[f"mae-{t}|lifetime_mae"] if defined else None, "rows": rows}
            else:
                defined = 0 < pos < rows
                out[t] = {"ne": values[f"ne-{t}|lifetime_ne"] if defined else None,
                          "auc": values[f"auc-{t}|window_auc"] if defined else None, "rows": rows, "positives": pos}
            if not defined:
                log.warning("eval: task %r has %d labelled rows, %d positive: its metrics are undefined "
                            "(reported as null)", t, rows, pos)
        return out


def _infos(tasks: Sequence[str]) -> List[RecTaskInfo]:
    return [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
