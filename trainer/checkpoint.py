"""Checkpoints with torch.distributed.checkpoint: the DMP state dict (sharded tables, dense
weights, balancer buffers), both optimizers (fused embedding state and the dense one) and the
step, from which the data position follows (every epoch has the same number of steps).

Layout: `ROOT/step-000000123/` (DCP writes `.metadata` last, on the coordinator, once every
rank's part is written: a directory without it is incomplete) and `ROOT/latest`, the name of
the newest complete checkpoint, replaced atomically after each save. Resume takes `latest`
if it names a complete checkpoint, else (with a warning) the newest complete one; incomplete
directories are removed at start; the newest `keep` complete ones are kept.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.optim.keyed import KeyedOptimizerWrapper

from trainer.errors import CheckpointError
from trainer.identity import write_atomic

log = logging.getLogger(__name__)
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(dmp, optimizer, step: int) -> dict:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
            "progress": {"step": torch.tensor(step, dtype=torch.int64)}}


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file()


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


class CheckpointDir:
    def __init__(self, root: str | Path, keep: int = 0):
        self.root, self.keep = Path(root), keep

    def _steps(self) -> List[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=step_of)

    def complete(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        return [p for p in self._steps() if is_complete(p)]

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: `latest` if it names a complete one, else the newest
        complete one (a crash between DCP's save and the pointer's update, or a lost pointer)."""
        marker = self.root / LATEST
        named = marker.read_text().strip() if marker.is_file() else ""
        if named and STEP_DIR.match(named) and is_complete(self.root / named):
            return self.root / named
        found = self.complete()
        if marker.exists() or found:
            log.warning("checkpoint pointer %s %s; resuming from the newest complete checkpoint: %s", marker,
                        f"names {named!r}, not a complete checkpoint" if named else "is missing or empty",
                        found[-1].name if found else "none")
        return found[-1] if found else None

    def remove_incomplete(self) -> None:
        """Before training, on rank 0: incomplete checkpoints of an earlier attempt go."""
        if _is_main():
            for p in self._steps():
                if not is_complete(p):
                    log.warning("removing incomplete checkpoint %s", p)
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, dmp, optimizer, step: int) -> Path:
        path = self.root / f"step-{step:09d}"
        try:
            dcp.save(_state(dmp, optimizer, step), checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure into one
            raise CheckpointError(f"saving checkpoint {path} failed ({self._free()}): {_cause(e)}") from e
        if _is_main():  # after every rank finished its part; an atomic replace
            write_atomic(self.root / LATEST, path.name)
            self._retain()
        _barrier()
        log.info("saved checkpoint %s", path)
        return path

    def _retain(self) -> None:
        done = self.complete()
        for old in done[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def _free(self) -> str:
        try:
            return f"{shutil.disk_usage(self.root).free / 2**30:.2f} GiB free at {self.root}"
        except OSError:
            return f"free space at {self.root} unknown"


def state_bytes(dmp, optimizer) -> int:
    """This rank's share of a checkpoint, in bytes (local shards of sharded tensors)."""
    total = 0
    for sd in (dmp.state_dict(), optimizer.state_dict()):
        stack = [sd]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, (list, tuple)):
                stack.extend(node)
            elif hasattr(node, "local_shards"):  # ShardedTensor
                total += sum(s.tensor.numel() * s.tensor.element_size() for s in node.local_shards())
            elif hasattr(node, "to_local"):  # DTensor
                total += node.to_local().numel() * node.to_local().element_size()
            elif isinstance(node, torch.Tensor):
                total += node.numel() * node.element_size()
    return total


def load(path: str | Path, dmp, optimizer) -> int:
    """Loads in place; returns the step the checkpoint was taken at."""
    # Dense optimizer state (e.g. Adam's moments) is created lazily at the first step; DCP
    # loads in place, so it must exist first. Fused embedding optimizers have theirs already.
    for _, opt in optimizer.optimizers:
        if isinstance(opt, KeyedOptimizerWrapper):
            opt.init_state()
    state = _state(dmp, optimizer, 0)
    present = _without_empty(state)
    try:
        dcp.load(present, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"loading checkpoint {path} failed: {_cause(e)}") from e
    _merge(state, present)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    log.info("resumed from %s", path)
    return int(state["progress"]["step"])


def _cause(e: BaseException) -> str:
    """The root failures of a DCP exception, one line per rank (CheckpointException is a
    BaseException whose text holds every rank's whole traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(f[0]).__name__}: {f[0]}" for r, f in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def _without_empty(d: dict) -> dict:
    """`d` without empty sub-dicts (at any depth): a stateless optimizer (fused SGD) has an
    empty state per parameter, which DCP saves as nothing and then cannot find when loading.
    New dicts, same leaves: tensors still load in place."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _without_empty(v)
            if not v:
                continue
        out[k] = v
    return out


def _merge(into: dict, loaded: dict) -> None:
    """Copies the loaded leaves (non-tensor values are replaced, not loaded in place) back."""
    for k, v in loaded.items():
        if isinstance(v, dict):
            _merge(into[k], v)
        else:
            into[k] = v
