"""Per-task metrics over the whole eval set, across all ranks, with torchrec.metrics: NE (the
paper's metric), AUC and calibration (the weighted mean prediction over the weighted label
rate) for binary tasks, MSE and MAE for regression tasks. Each row counts with its weight for
the task (0 where unlabelled; a task's weight column where it has one).

Grouped AUC (`data.eval_group`, a user or request column): within each group the weighted AUC
(ties count half), averaged over the groups weighted by their labelled rows; a group whose
labelled rows are all of one class is skipped and counted. A group's rows may be on any rank,
so every rank's (group, prediction, label, weight) rows are gathered and GAUC is computed
exactly, on every rank alike. torchrec's GAUC module does not serve here: it takes groups as
contiguous sessions of one batch and averages them unweighted.

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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.mae import MAEMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

from data.reader import NO_GROUP

log = logging.getLogger(__name__)


def window_size(world_size: int, batch_size: int, max_rank_rows: int, steps: int) -> int:
    """The global window: every rank's local window, ceil(window / world), holds the fullest
    rank's rows plus one padding row per step, and is at least one batch (torchrec's check)."""
    return world_size * (max(max_rank_rows + steps, batch_size) + 1)


class Evaluator:
    def __init__(self, tasks: List[str], world_size: int, rank: int, batch_size: int,
                 max_rank_rows: int, steps: int, device: torch.device, regression: Sequence[bool] = (),
                 grouped: bool = False):
        self.tasks = tasks
        self.regression = list(regression) or [False] * len(tasks)
        self.binary = [t for t, r in zip(tasks, self.regression) if not r]
        self.valued = [t for t, r in zip(tasks, self.regression) if r]
        common = dict(world_size=world_size, my_rank=rank, batch_size=batch_size,
                      compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
                      window_size=window_size(world_size, batch_size, max_rank_rows, steps),
                      compute_on_all_ranks=True)
        self.metrics = [(cls(**common, tasks=_infos(group)).to(device), group) for cls, group in (
            (NEMetric, self.binary), (AUCMetric, self.binary), (CalibrationMetric, self.binary),
            (MSEMetric, self.valued), (MAEMetric, self.valued)) if group]
        self.counts = torch.zeros(2, len(tasks), dtype=torch.float64, device=device)  # [labelled, positive] x M
        self.grouped = grouped
        self.rows: List[Tuple[np.ndarray, ...]] = []  # (group [B], preds, labels, weights [B, M]) for GAUC

    def update(self, preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
               group: Optional[torch.Tensor] = None) -> None:
        """preds (probabilities, or values for regression tasks) / labels / weights [B, M];
        group [B] (grouped eval: the rows' group ids; None for a padding batch)."""
        if self.grouped and group is not None:
            self.rows.append((group.numpy(), *(t.double().cpu().numpy() for t in (preds, labels, weights))))
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
                          "auc": values[f"auc-{t}|window_auc"] if defined else None,
                          "calibration": values[f"calibration-{t}|lifetime_calibration"] if pos > 0 else None,
                          "rows": rows, "positives": pos}
            if not defined:
                log.warning("eval: task %r has %d labelled rows, %d positive: its metrics are undefined "
                            "(reported as null)", t, rows, pos)
        if self.grouped:
            self._grouped(out)
        return out

    def _grouped(self, out: Dict[str, Dict]) -> None:
        """GAUC of every binary task, from every rank's rows (gathered)."""
        mine = [np.concatenate(c) for c in zip(*self.rows)] if self.rows else None
        every = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        every = [e for e in every if e is not None]
        if not every:
            return
        group, preds, labels, weights = (np.concatenate(c) for c in zip(*every))
        for m, t in enumerate(self.tasks):
            if not self.regression[m]:
                gauc, used, skipped = grouped_auc(group, preds[:, m], labels[:, m], weights[:, m])
                out[t].update(gauc=gauc, gauc_groups=used, gauc_groups_skipped=skipped)


def grouped_auc(group: np.ndarray, pred: np.ndarray, label: np.ndarray,
                weight: np.ndarray) -> Tuple[Optional[float], int, int]:
    """(GAUC, groups used, groups skipped) over rows [N]: within each group the weighted AUC
    (Mann-Whitney; a tied negative counts half), averaged over groups weighted by their labelled
    rows. Rows of weight 0 or of no group are left out; a group whose rows are all of one class
    is skipped. None without a usable group."""
    keep = (weight > 0) & (group != NO_GROUP)
    g, p, y, w = group[keep], pred[keep], label[keep] > 0, weight[keep]
    order = np.lexsort((p, g))  # by group, then prediction
    g, p, y, w = g[order], p[order], y[order], w[order]
    if not len(g):
        return None, 0, 0
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_block = new_group | np.r_[True, p[1:] != p[:-1]]  # tie blocks: one prediction within a group
    gid, bid = np.cumsum(new_group) - 1, np.cumsum(new_block) - 1  # [n]
    neg = np.bincount(bid, w * ~y)  # [blocks] negative weight of each tie block
    below = np.cumsum(neg) - neg  # negative weight of the blocks before, from the first group on
    below -= below[bid[new_group]][gid[new_block]]  # ... within its group
    credit = np.bincount(gid, w * y * (below + 0.5 * neg)[bid])  # [groups]
    pos_w, neg_w = np.bincount(gid, w * y), np.bincount(gid, w * ~y)
    rows = np.bincount(gid)
    ok = (pos_w > 0) & (neg_w > 0)
    if not ok.any():
        return None, 0, int(len(ok))
    auc = credit[ok] / (pos_w[ok] * neg_w[ok])
    return float((auc * rows[ok]).sum() / rows[ok].sum()), int(ok.sum()), int((~ok).sum())


def _infos(tasks: Sequence[str]) -> List[RecTaskInfo]:
    return [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
