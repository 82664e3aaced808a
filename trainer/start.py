"""Where a run starts from and at which data position: decided here, once, before the first step.

- **Resume** (out_dir holds a checkpoint and trainer.resume = true): every part of the newest
  checkpoint, its step and its data position. Under the same split (world size, reader
  workers, batch size, shuffling) the run continues exactly where it stopped (bitwise the
  state of a straight run). Under another split, the checkpoint's record of the epoch's
  consumed (file, row group) units gives the rest of the epoch, dealt to the new readers
  (a "leg"); a unit that was partly read is read again or left out (trainer.partial_units),
  and counted in summary.json (`start.resplit`). Later epochs are whole, under the new split.
- **Warm start** (trainer.init_from, no checkpoint of its own yet): trainer.init_parts of a
  parent run's newest (or named) checkpoint, checked to fit this model; the parent's dense
  transforms unless trainer.refit_transforms; step 0 of this run's data. run.json records the
  parent (its checkpoint, step and identity digest). Metrics never carry over: no checkpoint
  holds metric state.
- **Fresh**: nothing loaded, step 0.

The training loop receives a `Start` (its step, total and `Timeline`) and knows none of this.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import posixpath
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import fsspec

from data.batch import Batch
from data.errors import detailed
from data.position import Split, consumed
from data.reader import DataSource, batches_per_rank
from trainer import checkpoint, identity
from trainer.checkpoint import CheckpointDir, is_remote
from trainer.errors import AlreadyFinished, NoCheckpoint, RunError

log = logging.getLogger(__name__)
STATS_FILE = "dense_stats.json"  # the dense transforms' fitted numbers, kept for eval, resume and warm starts


@dataclass
class Position:
    """Where in the data a step stands. Epoch `epoch` is read in legs; the current leg began at
    step `leg_start` and reads `units` (indices into the split's (file, row group) units; None:
    all of them) under this run's split; `done`: the epoch's units consumed before the leg."""
    epoch: int = 0
    leg_start: int = 0
    units: Optional[List[int]] = None
    done: List[int] = field(default_factory=list)


def split_of(src: DataSource) -> Split:
    cfg = src.cfg
    return Split(src.world_size, max(cfg.num_workers, 1), cfg.batch_size, src.shuffle, cfg.shuffle_seed,
                 cfg.shuffle_buffer)


class Timeline:
    """The steps of a run from its start position: the current leg, then whole epochs."""

    def __init__(self, src: DataSource, start: Position):
        self.src, self.start, self.split = src, start, split_of(src)
        self.leg_end = start.leg_start + src.deal(start.units)[1]

    def at(self, step: int) -> Position:
        if step < self.leg_end:
            return self.start
        whole, _ = divmod(step - self.leg_end, self.src.steps_per_epoch)
        return Position(self.start.epoch + 1 + whole, self.leg_end + whole * self.src.steps_per_epoch)

    def total(self, epochs: int) -> int:
        """The step at which `epochs` epochs are done."""
        return self.leg_end + (epochs - 1 - self.start.epoch) * self.src.steps_per_epoch

    def stream(self, step: int) -> Iterator[Batch]:
        """Batches from `step` on (a step of the start leg)."""
        it = self.src.epoch(self.start.epoch, self.start.units)
        skip = step - self.start.leg_start
        for _ in range(skip):  # re-read, not trained on
            next(it)
        if skip:  # their rows were counted by the attempt that trained on them
            self.src.counters.zero_()
        yield from it
        epoch = self.start.epoch + 1
        while True:
            yield from self.src.epoch(epoch)
            epoch += 1

    def record(self, step: int) -> str:
        """The data position of `step`, as a checkpoint keeps it: the leg, the split, and the
        epoch's (file, row group) units consumed and partly read."""
        pos = self.at(step)
        units = pos.units if pos.units is not None else list(range(len(self.src.unit_rows)))
        c = consumed(units, self.src.unit_rows, self.split, pos.epoch, step - pos.leg_start)
        return json.dumps({**dataclasses.asdict(pos), "split": dataclasses.asdict(self.split),
                           "consumed": self._named(sorted(set(pos.done) | set(c.units))),
                           "partial": self._named(c.partial), "partial_rows_read": c.partial_rows_read})

    def _named(self, units: List[int]) -> Dict[str, List[int]]:
        out: Dict[str, List[int]] = {}
        for u in units:
            path, rg = self.src.footers.units[u]
            out.setdefault(path, []).append(rg)
        return out


@dataclass
class Origin:
    """What a run starts from, found on rank 0 before the data is read."""
    kind: str  # "fresh" | "resume" | "parent"
    checkpoint: Optional[str] = None
    parts: List[str] = field(default_factory=lambda: list(checkpoint.PARTS))
    transforms: Optional[dict] = None  # the dense transforms to reuse (None: fit them)
    record: Optional[dict] = None  # the parent's run.json
    hold: Optional[ExitStack] = None  # the parent's checkpoint pinned against its run's clean-up

    def release(self) -> None:
        """After every rank has read the parent's checkpoint."""
        if self.hold is not None:
            self.hold.close()

    def __getstate__(self) -> dict:  # (broadcast to the other ranks: the pin stays with rank 0)
        return {**self.__dict__, "hold": None}


def find_origin(cfg, out: Path, ckpts: CheckpointDir) -> Origin:
    tcfg = cfg.trainer
    latest = ckpts.latest()
    if latest is not None:
        if not tcfg.resume:
            raise RunError(f"{out} holds checkpoints of an earlier run (newest: {latest}) and "
                           f"trainer.resume = false: use a new trainer.out_dir, or remove {ckpts.uri}")
        saved = out / STATS_FILE
        return Origin("resume", latest, transforms=json.loads(saved.read_text()) if saved.is_file() else None)
    if not tcfg.init_from:
        return Origin("fresh")
    hold = pin_holder()
    try:
        ckpt, record, stats = trained_run(tcfg.init_from, "trainer.init_from =", not tcfg.refit_transforms, hold)
    except BaseException:
        hold.close()
        raise
    return Origin("parent", ckpt, list(tcfg.init_parts), stats, record, hold)


def trained_run(source: str, what: str, with_stats: bool = True, hold: Optional[ExitStack] = None) -> tuple:
    """(checkpoint, its run's run.json, its dense transforms or None) of a run directory,
    checkpoint directory or step-N checkpoint (`source`, named as `what` in errors), checked:
    an embedding layout this release reads, and the very statistics the run trained with. With
    `hold`, the checkpoint stays pinned against its run's clean-up until `hold` is closed."""
    ckpt, home = resolve_parent(source, what, hold)
    record = read_json(home, identity.RUN_FILE, f"{what} {source!r}: no {identity.RUN_FILE} beside checkpoint "
                       f"{ckpt}: cannot tell what trained it")
    check_layout(record, ckpt)
    stats = read_json(home, STATS_FILE, f"{what} {source!r}: no {STATS_FILE} beside checkpoint {ckpt} (the dense "
                      f"transforms it was trained with); a warm start can refit them (trainer.refit_transforms = "
                      f"true)") if with_stats else None
    if stats is not None:
        check_stats(record, stats, ckpt)
    return ckpt, record, stats


def pin_holder() -> ExitStack:
    """Where a picked checkpoint's pin is kept (`CheckpointDir.reading`): closed by its user once
    every rank has read the checkpoint, and at the latest when this process ends."""
    hold = ExitStack()
    atexit.register(hold.close)
    return hold


def resolve_parent(uri: str, what: str = "trainer.init_from =", hold: Optional[ExitStack] = None) -> tuple:
    """(checkpoint, the directories that may hold its run.json) of `uri`: one step-N checkpoint,
    a checkpoint directory (its newest), or a run directory. A run directory's checkpoints are its
    own `checkpoints/` (so that a copy or a move of it reads its own files, never the original's);
    only a run whose checkpoints live elsewhere by choice (trainer.checkpoint_dir: object storage,
    another disk) is read where its run.json says. The checkpoint is pinned in `hold` (without
    one, only while it is picked)."""
    if hold is None:
        with ExitStack() as picking:
            return _resolve(uri.rstrip("/"), what, picking)
    return _resolve(uri.rstrip("/"), what, hold)


def _resolve(uri: str, what: str, hold: ExitStack) -> tuple:
    fs, root = fsspec.core.url_to_fs(uri)
    if fs.isfile(f"{root}/.metadata"):
        parent = posixpath.dirname(uri)
        ckpt = hold.enter_context(CheckpointDir(parent).reading(posixpath.basename(uri)))
        return ckpt, [parent, posixpath.dirname(parent)]
    for where, homes in ((uri, [uri, posixpath.dirname(uri)]), (f"{uri}/checkpoints", [uri])):
        ckpt = _newest_pinned(where, hold)
        if ckpt is not None:
            return ckpt, [*homes, posixpath.dirname(ckpt)]
    record = read_json([uri], identity.RUN_FILE, None) or {}
    elsewhere = record.get("checkpoints") or ""
    copied = bool(elsewhere) and _default_of_another(elsewhere, uri)
    ckpt = _newest_pinned(elsewhere, hold) if elsewhere and not copied else None
    if ckpt is not None:
        log.info("%s %s: its checkpoints are at %s (trainer.checkpoint_dir)", what, uri, elsewhere)
        return ckpt, [uri, posixpath.dirname(ckpt)]
    moved = (f"; its {identity.RUN_FILE} names {elsewhere}, another run directory's checkpoints: this one is a copy "
             f"or a move of that run whose own checkpoints/ holds no complete checkpoint, and is not read in its "
             f"place" if copied else "")
    raise RunError(f"{what} {uri!r}: no complete checkpoint there (expected a run directory with checkpoints/, a "
                   f"checkpoint directory with a complete step-N checkpoint, or a step-N checkpoint itself){moved}")


def _newest_pinned(where: str, hold: ExitStack) -> Optional[str]:
    """The newest complete checkpoint under `where`, pinned in `hold`; None if there is none."""
    try:
        return hold.enter_context(CheckpointDir(where).reading())
    except NoCheckpoint:
        return None


def _default_of_another(ckpts: str, run_dir: str) -> bool:
    """Whether `ckpts` is the default checkpoint folder (DIR/checkpoints) of a directory other than
    `run_dir`: what a copied or moved run.json names."""
    if is_remote(ckpts) or posixpath.basename(ckpts.rstrip("/")) != "checkpoints":
        return False
    owner = posixpath.dirname(ckpts.rstrip("/"))
    return is_remote(run_dir) or os.path.realpath(owner) != os.path.realpath(run_dir)


def read_json(dirs: List[str], name: str, missing: Optional[str]) -> Optional[dict]:
    for d in dirs:
        fs, root = fsspec.core.url_to_fs(d)
        if fs.isfile(f"{root}/{name}"):
            return json.loads(fs.cat_file(f"{root}/{name}"))
    if missing is not None:
        raise RunError(missing)
    return None


@dataclass
class Start:
    step: int
    total: int
    timeline: Timeline
    record: dict  # what run.json holds
    summary: dict  # summary.json's "start"


def plan(cfg, origin: Origin, ident: dict, src: DataSource, out: Path, ckpts: CheckpointDir) -> Start:
    """The start of this run (every rank computes it alike): checks the origin against this
    run, and places the first step in the data."""
    record = {**ident, "architecture": identity.architecture(cfg), "checkpoints": ckpts.uri,
              "embedding_order": "tables", "dense_stats": identity.stats_digest(src.transforms.to_dict()),
              "string_ids": list(src.footers.string_ids)}
    summary = {"from": origin.kind, "checkpoint": origin.checkpoint, "parts": origin.parts}
    if origin.kind == "fresh":
        return _begin(cfg, 0, Position(), src, record, summary)
    if origin.kind == "parent":
        _check_parent(cfg, origin, record)
        step = checkpoint.read_progress(origin.checkpoint)[0]
        record["parent"] = {"checkpoint": origin.checkpoint, "step": step, "identity": identity.digest(origin.record),
                            "parts": origin.parts, "transforms": "refit" if origin.transforms is None else "parent"}
        summary["parent_step"] = step
        return _begin(cfg, 0, Position(), src, record, summary)
    old = identity.check_resume(out, ident, cfg.trainer.allow_config_change, record["architecture"])
    check_layout(old, origin.checkpoint)
    if origin.transforms is not None:
        check_stats(old, origin.transforms, origin.checkpoint)
    if old.get("parent"):
        record["parent"] = old["parent"]
    step, saved = checkpoint.read_progress(origin.checkpoint)
    pos, resplit = _resume_position(step, saved, old, src, cfg.trainer.partial_units)
    if resplit:
        summary["resplit"] = resplit
    start = _begin(cfg, step, pos, src, record, summary)
    if step >= start.total and (out / "summary.json").is_file():
        raise AlreadyFinished(f"{out} holds a finished run (step {step} of {start.total}, summary.json): use a "
                              f"new trainer.out_dir, or raise trainer.epochs / trainer.max_steps to train on")
    if step > start.total:
        raise RunError(f"{out}: the checkpoint is at step {step}, past this config's {start.total} steps")
    return start


def _begin(cfg, step: int, pos: Position, src: DataSource, record: dict, summary: dict) -> Start:
    timeline = Timeline(src, pos)
    total = cfg.trainer.max_steps or timeline.total(cfg.trainer.epochs)
    return Start(step, total, timeline, record, {**summary, "step": step})


def check_layout(record: dict, ckpt: str) -> None:
    """A checkpoint of a multi-rank run from before the embedding order was fixed (its run.json
    has no `embedding_order`) fed its dense layers the features in the order of its sharding
    plan: under this release's fixed order it would mean another function. Refused, not guessed."""
    if record.get("embedding_order") is None and int(record.get("world_size", 1)) > 1:
        raise RunError(f"checkpoint {ckpt} was trained on {record['world_size']} ranks by an earlier release, whose "
                       f"dense layers saw the embeddings in the order of its sharding plan; this release always "
                       f"uses the tables' order, so it cannot continue, score or export it: train it anew")


def check_stats(record: dict, stats: dict, ckpt: str) -> None:
    """The dense transforms about to be reused are the ones the checkpoint's run was trained with
    (its run.json keeps their digest; a dense_stats.json edited or replaced since is refused)."""
    want = record.get("dense_stats")
    if want is not None and identity.stats_digest(stats) != want:
        raise RunError(f"{STATS_FILE} beside checkpoint {ckpt} is not the one its run was trained with (digest "
                       f"{identity.stats_digest(stats)}, run.json says {want}): restore it, or set "
                       f"trainer.refit_transforms = true for a warm start on refitted transforms")


def _check_parent(cfg, origin: Origin, record: dict) -> None:
    """What a warm start may not change: the architecture (tables, their rows and dims, tasks,
    dense features, model), and for the optimizer and balancer parts their kinds."""
    parent = origin.record
    problems = identity.architecture_changes(parent["architecture"], record["architecture"]) \
        if "architecture" in parent else []
    for part, keys in (("optim", ("optim.dense", "optim.sparse")), ("balancer", ("balancer.method",))):
        for key in keys:
            if part in origin.parts and key in parent and parent[key] != record.get(key):
                problems.append(f"{key}: {parent[key]!r} in the parent, {record.get(key)!r} here (a warm start "
                                f"without its state: trainer.init_parts without {part!r})")
    if problems:
        raise RunError(detailed(f"trainer.init_from = {cfg.trainer.init_from!r}: the parent does not fit this "
                                f"config ({len(problems)} difference(s) below; its checkpoint: "
                                f"{origin.checkpoint})", problems))


def _resume_position(step: int, saved: Optional[str], old: dict, src: DataSource, rule: str):
    """(position, resplit counts or None) of a resume at `step` of a checkpoint whose position
    record is `saved` (None: a checkpoint from before positions were recorded, whose epochs
    were whole and dealt under the split in its run.json)."""
    now = split_of(src)
    if saved:
        rec = json.loads(saved)
        pos = Position(rec["epoch"], rec["leg_start"], rec["units"], rec["done"])
        then = Split(**rec["split"])
    else:
        then = Split(old["world_size"], max(old["data.num_workers"], 1), old["data.batch_size"],
                     old.get("data.shuffle", False), old.get("data.shuffle_seed", 0), old.get("data.shuffle_buffer", 0))
        spe = max(batches_per_rank(src.unit_rows, then.world_size, then.num_workers, then.batch_size))
        pos = Position(step // spe, step // spe * spe)
    if then == now:
        return pos, None
    every = list(range(len(src.unit_rows)))
    c = consumed(pos.units if pos.units is not None else every, src.unit_rows, then, pos.epoch, step - pos.leg_start)
    done = set(pos.done) | set(c.units) | (set(c.partial) if rule == "skip" else set())
    left = [u for u in every if u not in done]
    partial_rows = sum(src.unit_rows[u] for u in c.partial)
    resplit = {"from": dataclasses.asdict(then), "to": dataclasses.asdict(now), "epoch": pos.epoch,
               "units_consumed": len(set(pos.done) | set(c.units)), "units_left": len(left),
               "partial_units": len(c.partial), "partial_rule": rule,
               "rows_trained_twice": c.partial_rows_read if rule == "reread" else 0,
               "rows_skipped": partial_rows - c.partial_rows_read if rule == "skip" else 0}
    log.warning("resuming at step %d under another split (%s -> %s): epoch %d goes on with its %d unread (file, "
                "row group) units; %d partly read unit(s) %s", step, _brief(then), _brief(now), pos.epoch, len(left),
                len(c.partial), f"read again ({c.partial_rows_read} rows trained twice)" if rule == "reread"
                else f"left out ({resplit['rows_skipped']} rows not trained on this epoch)")
    return Position(pos.epoch, step, left, sorted(done)), resplit


def _brief(s: Split) -> str:
    return f"{s.world_size} rank(s) x {s.num_workers} worker(s), batch {s.batch_size}"
