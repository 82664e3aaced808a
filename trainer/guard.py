"""Non-finite guard: a NaN or inf loss, task gradient norm or task weight stops the run with
the step range and data position, before any checkpoint can hold it.

Per step it only ORs a device-side flag (no host sync); the flag is read, and agreed across
ranks with one all-reduce, at the checks: every `every` steps (the trainer uses its log steps
unless `trainer.check_every` is set), before every checkpoint and before the final eval.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.distributed as dist

from trainer.errors import NonFiniteError


class NonFiniteGuard:
    def __init__(self, device: torch.device, steps_per_epoch: int, tasks: Iterable[str]):
        self.bad = torch.zeros(len(list(tasks)), dtype=torch.bool, device=device)  # [M]
        self.tasks = list(tasks)
        self.steps_per_epoch = steps_per_epoch
        self.checked = 0  # the last step known to be clean

    def observe(self, losses: torch.Tensor) -> None:
        """losses [M] of one step."""
        self.bad |= ~torch.isfinite(losses)

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
