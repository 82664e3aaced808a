"""Non-finite guard: a NaN or inf loss, task gradient norm or task weight stops the run with
the step range and data position, before any checkpoint can hold it.

Per step it only ORs a device-side flag (no host sync); the flag is read, and agreed across
ranks with one all-reduce, at the checks: every `every` steps (the trainer uses its log steps
unless `trainer.check_every` is set), before every checkpoint and before the final eval.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from trainer.errors import NonFiniteError, RunError

log = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(self, device: torch.device, steps_per_epoch: int, tasks: Iterable[str]):
        self.tasks = list(tasks)
        self.bad = torch.zeros(len(self.tasks), dtype=torch.bool, device=device)  # [M]
        self.labelled = torch.zeros(len(self.tasks), dtype=torch.float64, device=device)  # [M] rows with weight > 0
        self.steps_per_epoch = steps_per_epoch
        self.checked = 0  # the last step known to be clean

    def observe(self, losses: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """losses [M] of one step; weights [B, M] of its rows (0: unlabelled for that task)."""
        self.bad |= ~torch.isfinite(losses)
        if weights is not None:
            self.labelled += (weights > 0).sum(0)

    def check_trained(self, step: int, start: int) -> None:
        """After the last step: a task that had no labelled row (with a weight > 0) in any step of
        this attempt trained on nothing, whatever its eval says (labels all NaN, which footers
        count as values; weights all 0). An error for a run that trained from step 0; a warning
        for a resumed attempt, which saw only the steps after its checkpoint."""
        counts = self.labelled.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        empty = [t for t, n in zip(self.tasks, counts.tolist()) if n == 0]
        if not empty:
            return
        what = (f"task(s) {', '.join(empty)} had no labelled row with a weight > 0 in steps {start + 1}-{step} "
                f"(labels null or NaN everywhere, or weights all 0): nothing trained them")
        if start == 0:
            raise RunError(f"{what}; check the label and weight columns with `mbrec validate`")
        log.warning("%s (this attempt, resumed at step %d)", what, start)

    def check(self, step: int, stats: Dict[str, torch.Tensor], params: Iterable[torch.Tensor] = ()) -> None:
        """Raises NonFiniteError on every rank if any rank saw a non-finite loss since the last
        check, or holds a non-finite balancer statistic [M] or parameter (`params`: the dense
        ones, checked before a checkpoint)."""
        flags = self.bad.clone().float()  # [M]
        for values in stats.values():
            flags = torch.maximum(flags, (~torch.isfinite(values.float().reshape(-1)[:len(self.tasks)])).float())
        bad_param = any(not bool(torch.isfinite(p).all()) for p in params)
        flags = torch.cat([flags, torch.tensor([float(bad_param)], device=flags.device)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.any():
            raise NonFiniteError(self._message(step, flags.tolist()))
        self.checked = step

    def _message(self, step: int, flags) -> str:
        tasks = [t for t, f in zip(self.tasks, flags) if f]
        first = self.checked + 1
        epoch, batch = divmod(first - 1, self.steps_per_epoch)
        where = (f"between step {first} and step {step} (from epoch {epoch}, batch {batch} of each rank's "
                 f"share; {self.steps_per_epoch} batches per epoch)")
        what = f"non-finite loss, gradient or weight of task(s) {', '.join(tasks)}" if tasks else \
            "non-finite dense parameters"
        return (f"{what} {where}; no checkpoint was written after step {self.checked}. Check the data with "
                f"`mbrec validate`, or lower the learning rates")
