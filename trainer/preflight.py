"""Checks before the first step: everything that would otherwise be found hours later (at
the first save, at the final eval) or never (a run that trains nothing and exits 0).

Every rank runs the checks and the ranks agree on the outcome (`agreed`): one rank's failure
(a file it cannot read, a directory it cannot write) fails every rank with the same message,
instead of leaving the others waiting in a collective."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TypeVar

import torch.distributed as dist

from data.errors import DataError
from data.reader import DataSource
from trainer.errors import AlreadyFinished, CheckpointError, NonFiniteError, RunError

log = logging.getLogger(__name__)
T = TypeVar("T")
AGREED_ERRORS = {cls.__name__: cls for cls in (RunError, NonFiniteError, CheckpointError, AlreadyFinished,
                                                DataError)}


def agreed(fn: Callable[[], T]) -> T:
    """fn() on every rank; if it raises on any rank, every rank raises (the failing rank its own
    exception, the others the first failing rank's message, as a RunError unless it is one of
    AGREED_ERRORS): an error on one rank alone would leave the others waiting in the next
    collective until the process-group timeout."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as e:  # every kind: whatever one rank meets, all ranks stop on
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}\0{error}")
        first = next(((r, m) for r, m in enumerate(msgs) if m is not None), None)
        if first is not None:
            kind, text = first[1].split("\0", 1)
            if error is None:
                error = AGREED_ERRORS.get(kind, RunError)(f"{text} (rank {first[0]})")
    if error is not None:
        raise error
    return result


def on_main(fn: Callable[[], T]) -> T:
    """fn() on rank 0 only, its result broadcast to every rank: work a job needs done once
    (footers, statistics), not once per rank. A failure there fails every rank (`agreed`)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    result = agreed(lambda: fn() if main else None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def check_data(train: DataSource, eval_: DataSource, tasks: List[str]) -> None:
    """Empty inputs, tasks without labels: from the Parquet footers, no data read."""
    if not tasks:
        raise RunError("data.tasks is empty: a run needs at least one task (its label column)")
    for name, src in (("data.train", train), ("data.eval", eval_)):
        if src.rows == 0:
            raise RunError(f"{name} has no rows ({len(src.files)} file(s), {len(src.unit_rows)} row groups: "
                           f"{', '.join(src.files[:3])}{' ...' if len(src.files) > 3 else ''})")
    for m, task in enumerate(tasks):
        if train.label_footers.labelled[m] == 0:
            raise RunError(f"task {task!r}: every label in data.train is null (column "
                           f"{train.cfg.tasks[m].column!r}): nothing to train it on")
        if train.cfg.tasks[m].kind != "binary":
            continue  # a regression label of 0 everywhere is still a label
        if train.label_footers.positive[m] == 0:
            log.warning("task %r: no positive label in data.train (every row group's maximum is 0)", task)
        if eval_.label_footers.labelled[m] == 0 or eval_.label_footers.positive[m] == 0:
            log.warning("task %r: data.eval has %s: its NE and AUC will be null", task,
                        "no labelled row" if eval_.label_footers.labelled[m] == 0 else "no positive label")


def check_id_kinds(trained: Sequence[str], footers, sparse_columns: Sequence[str], what: str) -> None:
    """Every sparse column holds ids of the kind training hashed (strings, or integers) in `what`
    too: an id 123 and an id "123" look up different rows."""
    now = set(footers.string_ids)
    for column in sparse_columns:
        if (column in trained) != (column in now):
            kinds = ("strings", "integers") if column in trained else ("integers", "strings")
            raise DataError(f"sparse column {column!r}: training ids are {kinds[0]} but {what} holds {kinds[1]} "
                            f"({footers.types.get(column)}, e.g. {footers.files[0]}): they would look up other rows; "
                            f"write one type")


def check_writable(path: Path) -> None:
    """trainer.out_dir exists and accepts a file (every rank: they may be on different machines;
    the checkpoint directory has its own check, `CheckpointDir.prepare`)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise RunError(f"trainer.out_dir {path} is not writable: {e}") from e


def check_disk(root: Path, rank_bytes: int, ranks_here: int, keep: int) -> None:
    """Free space for one more checkpoint of the ranks on this machine; a warning if the kept
    ones (keep + 1 while the next is written) will not fit."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return  # not a local file system: nothing to measure
    need = rank_bytes * ranks_here
    if free < 1.05 * need:
        raise RunError(f"checkpoint directory {root}: {_size(free)} free, one checkpoint of the "
                       f"{ranks_here} rank(s) on this machine needs about {_size(need)}")
    if keep and free < (keep + 1) * need:
        log.warning("checkpoint directory %s: %s free, %d kept checkpoints need about %s",
                    root, _size(free), keep + 1, _size((keep + 1) * need))


def check_memory(rank_bytes: int, ranks_here: int, asynchronous: bool) -> None:
    """Host memory for what a save stages on each rank of this machine (`rank_bytes`: its
    largest tensor; with trainer.async_checkpoint, its whole shard besides), beyond what the
    ranks hold now: a save that does not fit would be killed hours into the run."""
    free = available_memory()
    need = rank_bytes * ranks_here
    if free is not None and free < 1.1 * need:
        what = "a copy of its shard and its largest tensor" if asynchronous else "its largest tensor"
        hint = " (or set trainer.async_checkpoint = false)" if asynchronous else ""
        raise RunError(f"host memory: {_size(free)} available, a checkpoint save stages {what} on each of the "
                       f"{ranks_here} rank(s) on this machine: about {_size(need)}; free memory or run on more "
                       f"machines{hint}")


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the system's MemAvailable, or less under a cgroup
    (v2) memory limit (a container, a Slurm job); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:  # this process's cgroup: "0::/PATH" (v2)
        where = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip().lstrip("/")
        limit = (where / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((where / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def _size(n: float) -> str:
    """GiB, or MiB where GiB would round to 0."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 100 else f"{n / 2**20:.2f} MiB"
