"""Run identity: what a checkpoint was trained with, saved beside it (`OUT/run.json`) and
compared on resume, so that a checkpoint never silently continues under another config.

- Data keys: the training files (their resolved list and row-group sizes). A resume that
  changes them is always refused (a new partition is a warm start: `trainer.init_from`).
- Split keys (batch size, reader workers, world size) may change on resume: the checkpoint
  records which units of the epoch were consumed, and the rest of the epoch is dealt to the
  new readers (trainer.start).
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
from typing import Any, Dict, List, Optional, Sequence

from data.errors import detailed
from trainer.errors import RunError

RUN_FILE = "run.json"
DATA_KEYS = ("data.train", "train_units")
SPLIT_KEYS = ("data.batch_size", "data.num_workers", "world_size")
RECORDS = ("parent", "architecture", "checkpoints", "embedding_order", "dense_stats", "string_ids")  # written beside the identity, never compared on resume
FREE = ("data.eval", "synth.", "trainer.out_dir", "trainer.epochs", "trainer.max_steps", "trainer.eval_every",
        "trainer.log_every", "trainer.checkpoint_every", "trainer.checkpoint_at_end", "trainer.resume",
        "trainer.progress_bar", "trainer.save_predictions", "trainer.keep_checkpoints", "trainer.checkpoint_dir",
        "trainer.allow_config_change", "trainer.pg_timeout_s", "trainer.storage_timeout_s", "trainer.async_checkpoint", "trainer.check_every", "trainer.device",
        "trainer.partial_units", "data.unlabelled", "data.eval_group",
        "model.head_bias_init")  # (read at a fresh start only: a resumed model's biases are its checkpoint's)
# keys added after run.json files were first written: a record without one was trained with this value
ADDED = {"trainer.init_from": "", "trainer.init_parts": ["model", "optim", "balancer"],
         "trainer.refit_transforms": False, "balancer.multibalance.gram_ema": 0.0}


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def units_digest(files: Sequence[str], unit_rows: Sequence[int]) -> str:
    """The training files and their row-group sizes (what the split is made of)."""
    return _sha([list(files), list(unit_rows)])


def identity(cfg, world_size: int, train_files: Sequence[str], unit_rows: Sequence[int]) -> Dict[str, Any]:
    """The flat {key: value} a run is identified by (the balancer: its method's keys only)."""
    flat = _flatten(dataclasses.asdict(cfg))
    method = cfg.balancer.method
    keep = {k: v for k, v in flat.items() if not k.startswith(FREE)
            and (not k.startswith("balancer.") or k == "balancer.method" or k.startswith(f"balancer.{method}."))}
    return {**keep, "world_size": world_size, "train_units": units_digest(train_files, unit_rows)}


def architecture(cfg) -> Dict[str, Any]:
    """What a checkpoint's tensors are shaped by, resolved (shared tables, default dims): the part
    of a run a warm start must keep."""
    dim = cfg.model.embedding_dim
    return {"tables": {t.name: {"rows": t.num_embeddings, "dim": t.dim or dim, "pooling": t.pooling,
                                "features": t.features} for t in cfg.data.table_specs()},
            "tasks": {t.name: t.kind for t in cfg.data.tasks}, "dense": list(cfg.data.dense),
            "model": dataclasses.asdict(cfg.model)}


def architecture_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two `architecture` records, one line per table, task or key."""
    out = []
    for section, what in (("tables", "table"), ("tasks", "task"), ("model", "model")):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if key not in b:
                out.append(f"{what} {key!r} only in the parent")
            elif key not in a:
                out.append(f"{what} {key!r} not in the parent")
            elif isinstance(a[key], dict) and isinstance(b[key], dict) and a[key] != b[key]:
                out += [f"{what} {key!r}: {f} {a[key].get(f)!r} in the parent, {b[key].get(f)!r} here"
                        for f in sorted(set(a[key]) | set(b[key])) if a[key].get(f) != b[key].get(f)]
            elif a[key] != b[key]:
                out.append(f"{what} {key!r}: {a[key]!r} in the parent, {b[key]!r} here")
    if old.get("dense") != new.get("dense"):
        out.append(f"dense features: {old.get('dense')!r} in the parent, {new.get('dense')!r} here")
    return out


def digest(record: Dict[str, Any]) -> str:
    """A run's identity digest (its run.json without the records)."""
    return _sha({k: v for k, v in record.items() if k not in RECORDS})


def stats_digest(stats: Dict[str, Any]) -> str:
    """The digest of a run's fitted dense transforms (dense_stats.json), kept in its run.json."""
    return _sha(stats)


def write_atomic(path: Path, text: str) -> None:
    """Readers (other ranks, a restarted job) see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dumps(record: Dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True, default=str)


def save(out_dir: Path, record: Dict[str, Any]) -> None:
    write_atomic(out_dir / RUN_FILE, dumps(record))


def changed_keys(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    norm = lambda v: json.loads(json.dumps(v, default=str))  # as saved: tuples become lists
    return sorted(k for k in set(old) | set(new) if k not in RECORDS and norm(old.get(k)) != norm(new.get(k)))


def check_resume(out_dir: Path, ident: Dict[str, Any], allow_change: bool,
                 arch: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Raises RunError if the checkpoints in out_dir were trained under another identity or on
    other training files (or, `arch` given, are another model's); returns the saved run.json (a
    change of split keys is allowed)."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        raise RunError(f"{out_dir} has checkpoints but no {RUN_FILE}: cannot tell what they were trained "
                       f"with; use a new trainer.out_dir (or trainer.resume = false after moving them away)")
    old = {**{k: v for k, v in ADDED.items() if k in ident}, **json.loads(path.read_text())}
    changed = changed_keys(old, ident)
    details = [f"{k}: {_brief(old.get(k))} -> {_brief(ident.get(k))}" for k in changed]
    other_model = architecture_changes(old["architecture"], arch) if arch and "architecture" in old else []
    if other_model:  # another model altogether: neither a resume nor a warm start can use it
        raise RunError(detailed(f"{out_dir} holds the checkpoints of another model ({len(other_model)} "
                                f"difference(s) below): give this run a trainer.out_dir of its own", other_model))
    if any(k in DATA_KEYS for k in changed):
        raise RunError(detailed(f"cannot resume {out_dir} on other training files: to train this model on new "
                                f"data, start a new trainer.out_dir with trainer.init_from = \"{out_dir}\"", details))
    other = [k for k in changed if k not in SPLIT_KEYS]
    if other and not allow_change:
        raise RunError(detailed(f"cannot resume {out_dir} under a different config: use a new trainer.out_dir, or "
                                f"set trainer.allow_config_change = true to continue anyway", details))
    return old


def _brief(value: Any, limit: int = 120) -> str:
    """A value in a message line: its repr, shortened in the middle beyond `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"
