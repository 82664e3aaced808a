"""Run identity: what a checkpoint was trained with, saved beside it (`OUT/run.json`) and
compared on resume, so that a checkpoint never silently continues under another config.

- Position keys fix the data position a step stands for (which rows each rank has read): the
  training files (their resolved list and row-group sizes), batch size, reader workers, world
  size. A resume that changes one is always refused: the data order cannot be recovered.
- Identity keys change what is trained (model, balancer, optimizers, losses, seed, precision,
  tables): a resume that changes one is refused unless `trainer.allow_config_change = true`.
- Everything else (eval files and cadence, logging, epochs / max_steps, out_dir...) may change:
  raising epochs continues a run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from trainer.errors import RunError

RUN_FILE = "run.json"
POSITION = ("data.train", "data.batch_size", "data.num_workers", "world_size", "train_units")
FREE = ("data.eval", "synth.", "trainer.out_dir", "trainer.epochs", "trainer.max_steps", "trainer.eval_every",
        "trainer.log_every", "trainer.checkpoint_every", "trainer.checkpoint_at_end", "trainer.resume",
        "trainer.progress_bar", "trainer.save_predictions", "trainer.keep_checkpoints", "trainer.checkpoint_dir",
        "trainer.allow_config_change", "trainer.pg_timeout_s", "trainer.check_every", "trainer.device")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def units_digest(files: Sequence[str], unit_rows: Sequence[int]) -> str:
    """The training files and their row-group sizes (what the split is made of)."""
    return hashlib.sha256(json.dumps([list(files), list(unit_rows)]).encode()).hexdigest()[:16]


def identity(cfg, world_size: int, train_files: Sequence[str], unit_rows: Sequence[int]) -> Dict[str, Any]:
    """The flat {key: value} a run is identified by (the balancer: its method's keys only)."""
    flat = _flatten(dataclasses.asdict(cfg))
    method = cfg.balancer.method
    keep = {k: v for k, v in flat.items() if not k.startswith(FREE)
            and (not k.startswith("balancer.") or k == "balancer.method" or k.startswith(f"balancer.{method}."))}
    return {**keep, "world_size": world_size, "train_units": units_digest(train_files, unit_rows)}


def write_atomic(path: Path, text: str) -> None:
    """Readers (other ranks, a restarted job) see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out_dir: Path, ident: Dict[str, Any]) -> None:
    write_atomic(out_dir / RUN_FILE, json.dumps(ident, indent=1, sort_keys=True, default=str))


def changed_keys(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    norm = lambda v: json.loads(json.dumps(v, default=str))  # as saved: tuples become lists
    return sorted(k for k in set(old) | set(new) if norm(old.get(k)) != norm(new.get(k)))


def check_resume(out_dir: Path, ident: Dict[str, Any], allow_change: bool) -> None:
    """Raises RunError if the checkpoints in out_dir were trained under another identity."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        raise RunError(f"{out_dir} has checkpoints but no {RUN_FILE}: cannot tell what they were trained "
                       f"with; use a new trainer.out_dir (or trainer.resume = false after moving them away)")
    old = json.loads(path.read_text())
    changed = changed_keys(old, ident)
    if not changed:
        return
    detail = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in changed)
    position = [k for k in changed if k in POSITION]
    if position:
        raise RunError(f"cannot resume {out_dir}: the data position depends on {', '.join(position)}, "
                       f"which changed ({detail}); use a new trainer.out_dir")
    if not allow_change:
        raise RunError(f"cannot resume {out_dir} under a different config ({detail}); use a new "
                       f"trainer.out_dir, or set trainer.allow_config_change = true to continue anyway")
