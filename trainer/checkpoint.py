"""Checkpoints with torch.distributed.checkpoint: the DMP state dict (sharded tables, dense
weights, balancer buffers), both optimizers (fused embedding state and the dense one) and the
step, from which the data position follows (every epoch has the same number of steps)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.keyed import KeyedOptimizerWrapper

log = logging.getLogger(__name__)
LATEST = "latest"


def _state(dmp, optimizer, step: int) -> dict:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
            "progress": {"step": torch.tensor(step, dtype=torch.int64)}}


def save(root: str | Path, dmp, optimizer, step: int) -> Path:
    root = Path(root)
    path = root / f"step-{step:09d}"
    dcp.save(_state(dmp, optimizer, step), checkpoint_id=str(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (root / LATEST).write_text(path.name)  # written after every rank finished its part
    if dist.is_initialized():
        dist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def latest(root: str | Path) -> Optional[Path]:
    marker = Path(root) / LATEST
    return Path(root) / marker.read_text().strip() if marker.is_file() else None


def load(path: str | Path, dmp, optimizer) -> int:
    """Loads in place; returns the step the checkpoint was taken at."""
    # Dense optimizer state (e.g. Adam's moments) is created lazily at the first step; DCP
    # loads in place, so it must exist first. Fused embedding optimizers have theirs already.
    for _, opt in optimizer.optimizers:
        if isinstance(opt, KeyedOptimizerWrapper):
            opt.init_state()
    state = _state(dmp, optimizer, 0)
    dcp.load(state, checkpoint_id=str(path))
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    log.info("resumed from %s", path)
    return int(state["progress"]["step"])
