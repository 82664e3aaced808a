"""Which rows of an epoch the readers have consumed after k batches of every rank: what a
checkpoint records, so that a run resumed under another split (world size, reader workers,
batch size, shuffling) reads the rest of the epoch and nothing twice.

Everything follows from the Parquet footers and the split, without reading data:
- the units (file, row group) are dealt round-robin to the world_size x num_workers readers
  (`assign_units`), each reader reads its units in `reader_order` (shuffled per epoch if
  data.shuffle) and cuts its rows into batches continuously across unit boundaries;
- a rank's DataLoader takes one batch from each of its workers in turn, skipping workers that
  have finished (`worker_batches_done`);
- with a shuffle buffer, rows are permuted within windows of consecutive units of at least
  `shuffle_buffer` rows (`data.reader.shuffle_rows`): a unit counts as consumed once its whole
  window has been read, and as partly read while its window is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np


def assign_units(num_units: int, world_size: int, num_workers: int) -> List[List[int]]:
    """Unit indices per reader g = rank * num_workers + worker (round-robin deal)."""
    readers = world_size * max(num_workers, 1)
    return [list(range(g, num_units, readers)) for g in range(readers)]


def reader_order(num_units: int, world_size: int, num_workers: int, reader: int, epoch: int,
                 shuffle: bool, seed: int) -> Tuple[List[int], Optional[np.random.Generator]]:
    """The indices (into the dealt list) reader g reads in epoch `epoch`, in order, and the
    generator its shuffle buffer goes on with (None without shuffling)."""
    mine = assign_units(num_units, world_size, num_workers)[reader]
    if not shuffle:
        return mine, None
    rng = np.random.default_rng([seed, epoch, reader])
    return [mine[i] for i in rng.permutation(len(mine))], rng


def worker_batches_done(worker_batches: Sequence[int], k: int) -> List[int]:
    """Batches each DataLoader worker of a rank has delivered when the rank has had k batches:
    the DataLoader takes them from its workers in turn (worker 0, 1, ...), skipping a worker
    once it has no more."""
    done = [0] * len(worker_batches)
    left, rnd = k, 0
    while left > 0:
        active = [w for w, b in enumerate(worker_batches) if b > rnd]
        if not active:
            break
        for w in active[:left]:
            done[w] += 1
        left -= min(left, len(active))
        rnd += 1
    return done


@dataclass(frozen=True)
class Split:
    """How an epoch's units are dealt and read: what a data position is relative to."""
    world_size: int
    num_workers: int
    batch_size: int
    shuffle: bool = False
    shuffle_seed: int = 0
    shuffle_buffer: int = 0


@dataclass
class Consumed:
    """Of the units a leg reads: those fully read, those partly read, and the rows of the
    latter already read."""
    units: List[int] = field(default_factory=list)
    partial: List[int] = field(default_factory=list)
    partial_rows_read: int = 0


def consumed(units: Sequence[int], unit_rows: Sequence[int], split: Split, epoch: int, k: int) -> Consumed:
    """After k batches of every rank in a leg that reads `units` (indices into unit_rows) under
    `split` in epoch `epoch`: which of them have been consumed. A rank past its own batch count
    reads padding only."""
    out = Consumed()
    nw = max(split.num_workers, 1)
    order = [reader_order(len(units), split.world_size, nw, g, epoch, split.shuffle, split.shuffle_seed)[0]
             for g in range(split.world_size * nw)]
    rows = [[unit_rows[units[i]] for i in mine] for mine in order]  # [readers][its units]
    window = split.shuffle_buffer if split.shuffle else 0
    for rank in range(split.world_size):
        per_worker = [math.ceil(sum(rows[rank * nw + w]) / split.batch_size) for w in range(nw)]
        for w, c in enumerate(worker_batches_done(per_worker, min(k, sum(per_worker)))):
            g = rank * nw + w
            read = min(c * split.batch_size, sum(rows[g]))
            _classify([units[i] for i in order[g]], rows[g], read, window, out)
    out.units.sort()
    out.partial.sort()
    return out


def _classify(units: List[int], rows: List[int], read: int, window: int, out: Consumed) -> None:
    """One reader's units in reading order, `read` of their rows read: grouped into the shuffle
    buffer's windows (one unit each without a buffer), each consumed, partly read or untouched."""
    start, i = 0, 0
    while i < len(units):
        j, size = i, 0
        while j < len(units) and (size == 0 or (window and size < window)):
            size += rows[j]
            j += 1
        if start + size <= read:
            out.units.extend(units[i:j])
        elif start < read:
            out.partial.extend(units[i:j])
            out.partial_rows_read += read - start
        start, i = start + size, j
