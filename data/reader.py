"""Streams Batches from Parquet files described by a `DataConfig`.

Split: the (file, row group) units of all files, in sorted order, are dealt round-robin to
the world_size x num_workers readers (reader g = rank * num_workers + worker). Every row is
read exactly once per epoch. Each reader batches its rows continuously across unit
boundaries, so its batch count is ceil(rows / batch_size); every rank can compute every other
rank's count from the Parquet footers alone, without communication (see `batches_per_rank`).

Bad input raises `DataError` naming the file and column: missing file or column, wrong
column type, a binary label outside {0, 1}, a non-finite regression label or weight, an
out-of-range id under id_policy="error". Dense columns go through the run's transforms
(data.transforms) and nulls are filled after them (counted); a null label masks that row for
that task; a null single id gives the row no id for that feature (counted). String ids are
hashed (data.hashing, counted); out-of-range or negative integer ids under id_policy="hash"
are remapped with `hash_ids` (counted).
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import COUNTERS, Batch
from data.errors import DataError
from data import forkserver_guard
from data.footers import Footers, id_value_type, is_string_like, read_footers, spread
from data.hashing import hash64_distinct, hash_ids, hash_strings
from data.position import assign_units, reader_order
from data.storage import open_parquet
from data.schema import DataConfig
from data.transforms import FittedTransforms, fit, needs_sample

log = logging.getLogger(__name__)
WORKER_TIMEOUT_S = 900.0  # a DataLoader worker that sends no batch for this long is an error


def rows_per_reader(unit_rows: Sequence[int], world_size: int, num_workers: int) -> List[int]:
    """Rows of each reader g = rank * num_workers + worker."""
    units = assign_units(len(unit_rows), world_size, max(num_workers, 1))
    return [sum(unit_rows[u] for u in mine) for mine in units]


def batches_per_rank(unit_rows: Sequence[int], world_size: int, num_workers: int,
                     batch_size: int) -> List[int]:
    nw = max(num_workers, 1)
    per_reader = rows_per_reader(unit_rows, world_size, nw)
    return [sum(math.ceil(per_reader[r * nw + w] / batch_size) for w in range(nw)) for r in range(world_size)]


@dataclass
class Chunk:
    """Decoded rows: dense [R, D], labels/mask [R, M], lengths [F, R] (KJT order once
    flattened), per feature values [L_f], and offsets [F, R + 1] (prefix sums of lengths, so
    that any row range slices in O(1))."""
    dense: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    values: List[np.ndarray]
    counters: np.ndarray
    offsets: np.ndarray = None  # type: ignore[assignment]
    group: Optional[np.ndarray] = None  # [R] int64 group ids (eval with data.eval_group), else None

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = np.zeros((self.lengths.shape[0], self.lengths.shape[1] + 1), np.int64)
            np.cumsum(self.lengths, axis=1, out=self.offsets[:, 1:])

    @property
    def rows(self) -> int:
        return self.dense.shape[0]

    def slice(self, a: int, b: int, with_counters: bool) -> "Chunk":
        """Rows [a, b) as views; the counters go with one slice of the chunk only. Offsets stay
        views too, so they need not start at 0: values are indexed relative to offsets[:, 0]."""
        o = self.offsets
        lo, hi = (o[:, a] - o[:, 0]).tolist(), (o[:, b] - o[:, 0]).tolist()
        return Chunk(self.dense[a:b], self.labels[a:b], self.mask[a:b], self.lengths[:, a:b],
                     [v[i:j] for v, i, j in zip(self.values, lo, hi)],
                     self.counters if with_counters else np.zeros_like(self.counters), o[:, a:b + 1],
                     None if self.group is None else self.group[a:b])

    def compact(self) -> "Chunk":
        """Copies views into arrays of their own: a pickled view would carry its whole base."""
        return Chunk(self.dense.copy(), self.labels.copy(), self.mask.copy(), self.lengths.copy(),
                     [v.copy() for v in self.values], self.counters.copy(), self.offsets.copy(),
                     None if self.group is None else self.group.copy())

    def take(self, idx: np.ndarray) -> "Chunk":
        """Rows `idx` [n], in that order (a copy)."""
        lengths = self.lengths[:, idx]  # [F, n]
        values = []
        for f, v in enumerate(self.values):
            n_f = lengths[f]
            out_start = np.cumsum(n_f) - n_f  # where each row's ids go in the output
            src = np.repeat(self.offsets[f, idx] - self.offsets[f, 0] - out_start, n_f) + np.arange(n_f.sum())
            values.append(v[src])
        return Chunk(self.dense[idx], self.labels[idx], self.mask[idx], lengths, values, self.counters.copy(),
                     group=None if self.group is None else self.group[idx])

    @staticmethod
    def concat(a: "Chunk", b: "Chunk") -> "Chunk":
        return Chunk(np.concatenate([a.dense, b.dense]), np.concatenate([a.labels, b.labels]),
                     np.concatenate([a.mask, b.mask]), np.concatenate([a.lengths, b.lengths], axis=1),
                     [np.concatenate([x, y]) for x, y in zip(a.values, b.values)], a.counters + b.counters,
                     group=None if a.group is None else np.concatenate([a.group, b.group]))


def batch_windows(chunks: Iterator[Chunk], size: int) -> Iterator[Chunk]:
    """Re-cuts a stream of chunks into chunks of `size` rows (the last may be shorter): views
    into each chunk, and a copy only for the batch that straddles two chunks."""
    carry: Optional[Chunk] = None
    for chunk in chunks:
        start, first = 0, True
        if carry is not None:
            start = min(size - carry.rows, chunk.rows)
            carry = Chunk.concat(carry, chunk.slice(0, start, True))
            first = False
            if carry.rows < size:
                continue
            yield carry
            carry = None
        while start + size <= chunk.rows:
            yield chunk.slice(start, start + size, first)
            start, first = start + size, False
        if start < chunk.rows:
            carry = chunk.slice(start, chunk.rows, first)
    if carry is not None:
        yield carry


class ChunkDecoder:
    """Arrow table of one row group -> Chunk, validating as it goes."""

    def __init__(self, cfg: DataConfig, transforms: FittedTransforms, group: str = ""):
        self.cfg, self.transforms, self.group = cfg, transforms, group

    def decode(self, table: pa.Table, path: str, rg: int) -> Chunk:
        counters = np.zeros(len(COUNTERS), np.int64)
        counters[COUNTERS.index("rows")] = table.num_rows
        dense = _as_float_matrix(table, self.cfg.dense)  # [R, D], NaN where null
        self._nonfinite(dense, table, path, rg, counters)  # +-inf: an error, or NaN (filled, counted)
        # nulls and NaN values alike are filled after the transform, and counted
        counters[COUNTERS.index("dense_filled")] = self.transforms.apply(dense) - counters[
            COUNTERS.index("dense_nonfinite")]
        labels, mask = self._labels(table, path, rg)
        lengths, values, offsets = [], [], []
        for f in self.cfg.sparse:
            lens, vals, offs = self._sparse(table.column(f.column), f.num_embeddings, path, f.column, counters)
            lengths.append(lens)
            values.append(vals)
            offsets.append(offs)
        group = group_ids(table.column(self.group)) if self.group else None
        if not lengths:  # no sparse feature
            return Chunk(dense, labels, mask, np.zeros((0, table.num_rows), np.int32), [], counters, group=group)
        return Chunk(dense, labels, mask, np.stack(lengths), values, counters, np.stack(offsets), group)

    def _nonfinite(self, dense: np.ndarray, table: pa.Table, path: str, rg: int, counters: np.ndarray) -> None:
        """+-inf (also a float64 beyond float32's range, which the cast made inf): one such value
        makes every loss NaN from the first step, so it is an error, or filled and counted."""
        inf = np.isinf(dense)  # (NaN is a null here: filled after the transform)
        if not inf.any():
            return
        if self.cfg.nonfinite == "error":
            row, j = (int(i) for i in np.argwhere(inf)[0])
            name = self.cfg.dense[j]
            raise DataError(f"{path}: dense column {name!r} has value {table.column(name)[row].as_py()!r} "
                            f"(row {row} of row group {rg}), not finite in float32 "
                            f"({int(inf.sum())} such values in this row group); "
                            f"data.nonfinite = 'fill' replaces them by the column's fill and counts them")
        dense[inf] = np.nan  # the column's fill, after the transform
        counters[COUNTERS.index("dense_nonfinite")] += int(inf.sum())

    def _labels(self, table: pa.Table, path: str, rg: int) -> Tuple[np.ndarray, np.ndarray]:
        """-> labels [R, M] (0 where unknown), weights [R, M] (0 where unknown: a null or NaN
        label; else the task's weight column, 1 without one). Binary labels must be 0 or 1,
        regression labels finite; weights finite and >= 0 (a null weight is 0)."""
        tasks = self.cfg.tasks
        y = _as_float_matrix(table, [t.column for t in tasks], absent={t.column for t in tasks
                                                                       if t.name in self.cfg.unlabelled})
        known = ~np.isnan(y)
        binary = np.array([t.kind == "binary" for t in tasks])
        bad = known & np.where(binary, (y != 0) & (y != 1), ~np.isfinite(y))
        if bad.any():
            row, m = (int(i) for i in np.argwhere(bad)[0])
            want = "0, 1 or null" if binary[m] else "finite or null (regression)"
            raise DataError(f"{path}: label column {tasks[m].column!r} has value {float(y[row, m]):g} "
                            f"(row {row} of row group {rg}); labels must be {want}")
        weights = known.astype(np.float32)
        for m, t in enumerate(tasks):
            if t.weight and t.name not in self.cfg.unlabelled:
                w = _as_float_matrix(table, [t.weight])[:, 0]
                null = table.column(t.weight).is_null().to_numpy(zero_copy_only=False)  # [R]: a null is 0
                wrong = ~null & ~((w >= 0) & np.isfinite(w))  # NaN, inf or negative: an error
                if wrong.any():
                    row = int(np.argmax(wrong))
                    raise DataError(f"{path}: weight column {t.weight!r} (task {t.name!r}) has value {float(w[row]):g} "
                                    f"(row {row} of row group {rg}); weights must be finite and >= 0")
                weights[:, m] *= np.nan_to_num(w, nan=0.0)
        return np.where(known, y, np.float32(0.0)), weights

    def _sparse(self, col: pa.ChunkedArray, n: int, path: str, name: str,
                counters: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> lengths [R], ids [L], offsets [R + 1] (zero-based)."""
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        offsets = None
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            if arr.null_count == 0:  # fast path: lengths from the offsets
                offsets = arr.offsets.to_numpy().astype(np.int64)
                offsets -= offsets[0]
                lengths = np.diff(offsets).astype(np.int32)
            else:
                lengths = arr.value_lengths().fill_null(0).to_numpy().astype(np.int32)
            flat = arr.flatten()
            if flat.null_count:
                raise DataError(f"{path}: column {name!r} has a null id inside a list")
        elif arr.null_count == 0:  # one id per row: shared constants (the Chunk stacks copies)
            lengths, offsets = _single_id_layout(len(arr))
            flat = arr
        else:
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            lengths = valid.astype(np.int32)
            counters[COUNTERS.index("ids_null")] += int((~valid).sum())
            flat = arr.drop_null()
        ids = self._ids(flat, n, path, name, counters)
        if offsets is None:
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return lengths, ids, offsets

    def _ids(self, flat: pa.Array, n: int, path: str, name: str, counters: np.ndarray) -> np.ndarray:
        """Id values (no nulls) -> table rows [L] int64: strings hashed (see data.hashing),
        integers kept, or remapped when outside [0, n) under id_policy = "hash"."""
        if is_string_like(id_value_type(flat.type)):
            counters[COUNTERS.index("ids_hashed")] += len(flat)
            return hash_strings(flat, n)
        ids = integer_ids(flat)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):  # two reductions; masks only if needed
            out = (ids < 0) | (ids >= n)
            if self.cfg.id_policy == "error":
                first = flat.to_numpy(zero_copy_only=False)[np.flatnonzero(out)[0]] if pa.types.is_uint64(
                    flat.type) else ids[out][0]  # a uint64 above int64's range is shown as it is in the file
                raise DataError(f"{path}: column {name!r} has id {int(first)} outside [0, {n}) "
                                f"(data.id_policy = 'error'; use 'hash' to remap)")
            ids = ids.copy()  # never write into Arrow's buffers
            ids[out] = hash_ids(ids[out], n)
            counters[COUNTERS.index("ids_remapped")] += int(out.sum())
        return ids


def integer_ids(flat: pa.Array) -> np.ndarray:
    """Integer id values (no nulls, plain or dictionary-encoded) -> int64 [L]. A uint64 id above
    int64's range wraps to a negative value, which id_policy then treats as out of range
    (remapped by its hash, or an error), the same in the reader and in id health."""
    if pa.types.is_dictionary(flat.type):
        flat = flat.dictionary_decode()
    return flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


NO_GROUP = np.iinfo(np.int64).min  # a row whose group is null: in no group


def group_ids(col: pa.ChunkedArray) -> np.ndarray:
    """A grouping column (a user id, a request id) -> int64 [R]: integers as they are, strings
    by their mbrec-hash64 (collisions those of a 64-bit hash), nulls NO_GROUP."""
    arr = col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if is_string_like(arr.type):
        out = np.full(len(arr), NO_GROUP, np.int64)
        out[valid] = (hash64_distinct(arr.drop_null()) >> np.uint64(1)).astype(np.int64)
        return out
    return np.where(valid, arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), NO_GROUP)


@functools.lru_cache(maxsize=8)
def _single_id_layout(rows: int) -> Tuple[np.ndarray, np.ndarray]:
    """lengths [R] of ones and offsets [R + 1] = 0..R, read-only."""
    lengths, offsets = np.ones(rows, np.int32), np.arange(rows + 1, dtype=np.int64)
    lengths.flags.writeable = offsets.flags.writeable = False
    return lengths, offsets


def _as_float_matrix(table: pa.Table, columns: Sequence[str], absent: frozenset = frozenset()) -> np.ndarray:
    """Numeric columns -> float32 [R, len(columns)], NaN where a value is null (Arrow's own
    conversion for floats and integers; booleans with nulls are cast first); `absent` columns
    (not in the files: unlabelled tasks) are all NaN."""
    out = np.empty((table.num_rows, len(columns)), np.float32)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: checked by the caller
        for j, name in enumerate(columns):
            if name in absent:
                out[:, j] = np.nan
                continue
            col = table.column(name)
            if col.null_count and pa.types.is_boolean(col.type):
                col = col.cast(pa.float32())
            out[:, j] = col.to_numpy()
    return out


def chunk_to_batch(chunk: Chunk, keys: List[str]) -> Batch:
    """Runs in the consuming process: DataLoader workers send Chunks (numpy arrays, pickled
    through the pipe), which is far cheaper than sending a handful of small tensors through
    shared-memory file descriptors for every batch."""
    per_key = [len(v) for v in chunk.values]
    kjt = KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(np.concatenate(chunk.values)),
        lengths=torch.from_numpy(chunk.lengths.ravel()), stride=chunk.rows,  # [F * R], key-major
        length_per_key=per_key, offset_per_key=[0] + list(itertools.accumulate(per_key)))
    return Batch(torch.from_numpy(chunk.dense), kjt, torch.from_numpy(chunk.labels),
                 torch.from_numpy(chunk.mask), torch.from_numpy(chunk.counters),
                 None if chunk.group is None else torch.from_numpy(chunk.group))


class ParquetBatches(IterableDataset):
    """One rank's share of the (file, row group) units for one epoch, as Chunks of batch_size
    rows (the last one may be shorter); DataLoader workers split it further. `chunk_to_batch`
    makes them Batches.

    Shuffling (`shuffle`, seeded by data.shuffle_seed, the epoch and the reader) permutes the
    order of each reader's units every epoch, and a shuffle buffer permutes rows within
    windows of `shuffle_buffer` rows. Which units a reader gets never changes, so every
    rank's batch count still follows from the footers and a resumed run finds its position.

    Files are opened inside `__iter__` (i.e. in the worker process), never in the parent:
    pyarrow's thread pools do not survive a fork.
    """

    def __init__(self, units: Sequence[Tuple[str, int]], cfg: DataConfig, rank: int, world_size: int,
                 epoch: int = 0, shuffle: bool = False, transforms: Optional[FittedTransforms] = None,
                 string_ids: Sequence[str] = (), group: str = ""):
        self.units, self.cfg, self.rank, self.world_size = list(units), cfg, rank, world_size
        self.string_ids = list(string_ids)  # read as dictionaries: hashed once per distinct value
        self.epoch, self.shuffle, self.transforms = epoch, shuffle, transforms
        self.keys = [f.name for f in cfg.sparse]
        self.group = group  # a column whose values group the rows (grouped eval metrics), or ""
        self.columns = sorted(set(cfg.columns) | ({group} if group else set()))

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        nw = self.cfg.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        mine, rng = reader_order(len(self.units), self.world_size, nw, self.rank * nw + worker, self.epoch,
                                 self.shuffle, self.cfg.shuffle_seed)
        chunks = self._decoded([self.units[u] for u in mine])
        if rng is not None and self.cfg.shuffle_buffer > 0:
            chunks = shuffle_rows(chunks, self.cfg.shuffle_buffer, rng)
        batches = batch_windows(chunks, self.cfg.batch_size)
        if info is None:
            yield from batches  # views are fine in-process
            return
        try:
            for batch in batches:  # a worker pickles its batches, so they get arrays of their own
                yield batch.compact()
        except DataError as e:
            # handed over as an item, not raised: the DataLoader would re-raise it under a
            # "Caught DataError in DataLoader worker process N" traceback, the message last
            yield WorkerFailure(str(e))

    def _decoded(self, units: List[Tuple[str, int]]) -> Iterator[Chunk]:
        decoder = ChunkDecoder(self.cfg, self.transforms, self.group)
        handles: Dict[str, pq.ParquetFile] = {}
        for path, rg in units:
            try:
                if path not in handles:
                    handles.clear()  # keep one file open at a time
                    handles[path] = open_parquet(path, self.string_ids)
                table = handles[path].read_row_group(rg, columns=self.columns)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: row group {rg}: cannot read: {e}") from e
            yield decoder.decode(table, path, rg)


def shuffle_rows(chunks: Iterator[Chunk], window: int, rng: np.random.Generator) -> Iterator[Chunk]:
    """Chunks gathered into windows of >= `window` rows, each permuted as a whole."""
    pending: List[Chunk] = []
    rows = 0
    for chunk in chunks:
        pending.append(chunk)
        rows += chunk.rows
        if rows >= window:
            whole = functools.reduce(Chunk.concat, pending)
            yield whole.take(rng.permutation(whole.rows))
            pending, rows = [], 0
    if pending:
        whole = functools.reduce(Chunk.concat, pending)
        yield whole.take(rng.permutation(whole.rows))


def _die_with_parent(rank: int, _worker_id: int) -> None:
    """DataLoader worker init: on Linux, the kernel kills the worker when its parent (the
    forkserver, which exits when its rank does) dies. A rank killed with SIGKILL (OOM killer, a
    fault) runs no clean-up, and its workers, blocked on a full queue, would otherwise live on,
    holding memory, after the job has restarted."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(forkserver_guard.PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        try:
            os.kill(rank, 0)
        except ProcessLookupError:  # the rank died before the call: nobody to read for
            os._exit(1)


def worker_context():
    """Workers are forked from a forkserver (a clean process that imported this module), never
    from the rank: a rank has threads (pyarrow's pools, gloo's loops, torch's), and a worker
    forked while one of them held a lock (an allocator's, say) waits for it forever. Seen: a
    worker stuck at its first step, its rank polling it and the other rank waiting in a
    collective, with no timeout reached."""
    ctx = multiprocessing.get_context("forkserver")
    # The death signal of a process started from a thread fires when that thread ends: only a
    # forkserver started from the main thread is told to die with the rank (data.forkserver_guard).
    os.environ[forkserver_guard.PARENT_ENV] = str(os.getpid()) if threading.current_thread() is threading.main_thread() else ""
    ctx.set_forkserver_preload([forkserver_guard.__name__, __name__])
    return ctx


def _within_timeout(chunks: Iterator) -> Iterator:
    """The DataLoader's chunks; a worker silent for WORKER_TIMEOUT_S is a DataError, not a hang."""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise DataError(f"no batch from a DataLoader worker in {WORKER_TIMEOUT_S:.0f} s (a worker stuck, or "
                            f"storage this slow for one row group): {e}") from None
        yield chunk


@dataclass
class WorkerFailure:
    """A DataError raised in a DataLoader worker, passed to the consuming process as an item."""
    message: str


def _as_is(chunk: Chunk) -> Chunk:
    return chunk


def sample_table(footers: Footers, cfg: DataConfig, columns: Sequence[str]) -> Optional[pa.Table]:
    """`columns` of up to cfg.stats_row_groups training row groups, spread evenly over the units
    (for the transforms' statistics and the id health); None without units. Read once on rank 0
    at start: `fit_transforms` and `id_health` take the same sample."""
    tables = []
    for i in spread(len(footers.units), cfg.stats_row_groups):
        path, rg = footers.units[i]
        try:
            tables.append(open_parquet(path).read_row_group(rg, columns=list(columns)))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: row group {rg}: cannot read: {e}") from e
    return pa.concat_tables(tables) if tables else None


COLLISION_WARNING = 0.05  # id health warns when more of a feature's sampled ids share a row


def id_health(footers: Footers, cfg: DataConfig, sample: Optional[pa.Table] = None) -> Dict[str, Dict[str, float]]:
    """Per sparse feature, from the sampled training row groups: distinct ids seen, the table's
    rows, the share of integer ids outside [0, n) (remapped), and the share of the distinct
    sampled ids that share their table row with another sampled id (each distinct id mapped as
    the reader maps it, then counted: a measurement on the sample, a lower bound for the whole
    split). Integer ids in [0, n) map to themselves and never collide. Warns when over
    COLLISION_WARNING of a feature's ids collide."""
    if sample is None:
        sample = sample_table(footers, cfg, sorted({f.column for f in cfg.sparse}))
    out: Dict[str, Dict[str, float]] = {}
    for f in cfg.sparse if sample is not None else []:
        ids = sample.column(f.column)
        flat = pc.list_flatten(ids) if pa.types.is_list(ids.type) or pa.types.is_large_list(ids.type) else ids
        flat = flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat
        if pa.types.is_dictionary(flat.type):
            flat = flat.dictionary_decode()
        flat = flat.drop_null()
        n = f.num_embeddings
        integer = pa.types.is_integer(flat.type)
        values = pc.unique(flat)  # the distinct sampled ids
        if integer:
            v = integer_ids(values)
            outside = (v < 0) | (v >= n)
            rows = np.where(outside, hash_ids(v, n), v)
            every = integer_ids(flat)  # numpy, not Arrow compute: a uint64 above int64's range must not raise
            remapped = int(((every < 0) | (every >= n)).sum())
        else:
            rows = hash_strings(values, n) if len(values) else np.zeros(0, np.int64)
            remapped = 0
        _, counts = np.unique(rows, return_counts=True)
        share = float(counts[counts > 1].sum() / len(rows)) if len(rows) else 0.0
        out[f.name] = {"sampled_distinct_ids": len(values), "table_rows": n, "collision_share": round(share, 4),
                       "ids": "integer" if integer else "string (hashed)",
                       "remapped_share": round(remapped / len(flat), 4) if integer and len(flat) else 0.0}
        if share > COLLISION_WARNING:
            log.warning("sparse feature %r: %.1f%% of its %d distinct sampled ids share a table row with another "
                        "(table of %d rows); consider num_embeddings >= %d (under 1%% expected to collide)",
                        f.name, 100 * share, len(values), n, 100 * len(values))
    return out


def base_rates(sample: Optional[pa.Table], cfg: DataConfig) -> List[Optional[float]]:
    """Per task, from the sampled training row groups: the weighted mean of its labels over its
    labelled rows (a binary task's positive rate, a regression task's mean label); None where
    the sample holds no labelled row (or the task is unlabelled). Values the reader would refuse
    (a binary label outside {0, 1}, a bad weight) are left out here: the reader names them."""
    out: List[Optional[float]] = []
    for t in cfg.tasks:
        if sample is None or t.name in cfg.unlabelled or t.column not in sample.column_names:
            out.append(None)
            continue
        y = _as_float_matrix(sample, [t.column])[:, 0].astype(np.float64)  # [R], NaN where null
        w = np.ones_like(y) if not t.weight else np.nan_to_num(_as_float_matrix(sample, [t.weight])[:, 0], nan=0.0)
        ok = np.isfinite(y) & np.isfinite(w) & (w >= 0) & ((y == 0) | (y == 1) if t.kind == "binary" else True)
        total = float(w[ok].sum())
        out.append(float((w[ok] * y[ok]).sum() / total) if total > 0 else None)
    return out


def fit_transforms(footers: Footers, cfg: DataConfig, sample: Optional[pa.Table] = None) -> FittedTransforms:
    """The dense transforms of a run, fitted on its training split (reads a sample only if
    needed and none is given)."""
    args = (cfg.dense, cfg.transform, cfg.dense_transform, cfg.dense_fill)
    if sample is None and needs_sample(*args, footers.ranges):
        sample = sample_table(footers, cfg, cfg.dense)
    raw = _as_float_matrix(sample, cfg.dense) if sample is not None else np.zeros((0, len(cfg.dense)), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return fit(*args, raw, footers.ranges)


class DataSource:
    """A split (train or eval) as seen by one rank: validated files, the per-rank batch
    counts, and epochs of exactly `steps_per_epoch` batches (padded, see Batch.padding)."""

    def __init__(self, patterns: Sequence[str], cfg: DataConfig, rank: int, world_size: int,
                 pin_memory: bool = False, footers: Optional[Footers] = None,
                 transforms: Optional[FittedTransforms] = None, shuffle: bool = False, group: str = ""):
        """`footers` (read here if not given: a distributed run reads them on one rank);
        `transforms` (fitted on this split if not given: eval takes the training split's);
        `group`: a column read into each Batch's group ids (eval's data.eval_group)."""
        self.cfg, self.rank, self.world_size, self.pin_memory = cfg, rank, world_size, pin_memory
        self.group = group
        self.footers = footers if footers is not None else read_footers(patterns, cfg)
        self.transforms = transforms if transforms is not None else fit_transforms(self.footers, cfg)
        self.shuffle = shuffle
        self.id_health: Dict[str, Dict[str, float]] = {}  # filled by the trainer (see id_health)
        self.files, self.label_footers = self.footers.files, self.footers.labels
        self.unit_rows = self.footers.unit_rows
        self.rank_batches = batches_per_rank(self.unit_rows, world_size, cfg.num_workers, cfg.batch_size)
        self.steps_per_epoch = max(self.rank_batches)
        self.rows = sum(self.unit_rows)
        nw = max(cfg.num_workers, 1)
        per_reader = rows_per_reader(self.unit_rows, world_size, nw)
        self.rank_rows = [sum(per_reader[r * nw:(r + 1) * nw]) for r in range(world_size)]
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64)  # summed as batches are read

    def deal(self, units: Optional[Sequence[int]] = None) -> Tuple[List[int], int]:
        """Per-rank batch counts and the steps of an epoch over `units` (indices into
        footers.units; None: every unit)."""
        if units is None:
            return self.rank_batches, self.steps_per_epoch
        counts = batches_per_rank([self.unit_rows[u] for u in units], self.world_size, self.cfg.num_workers,
                                  self.cfg.batch_size)
        return counts, max(counts)

    def dataset(self, epoch: int = 0, units: Optional[Sequence[int]] = None) -> ParquetBatches:
        dealt = self.footers.units if units is None else [self.footers.units[u] for u in units]
        return ParquetBatches(dealt, self.cfg, self.rank, self.world_size, epoch, self.shuffle,
                              self.transforms, self.footers.string_ids, self.group)

    def batches(self, num_workers: int, epoch: int = 0, units: Optional[Sequence[int]] = None) -> Iterator[Batch]:
        """This rank's real batches for one epoch (over `units`, see `deal`), read by
        `num_workers` DataLoader workers."""
        keys = [f.name for f in self.cfg.sparse]
        dataset = self.dataset(epoch, units)
        chunks = iter(dataset) if num_workers == 0 else DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,  # no conversion there
            worker_init_fn=functools.partial(_die_with_parent, os.getpid()), multiprocessing_context=worker_context(),
            timeout=WORKER_TIMEOUT_S)
        for chunk in _within_timeout(iter(chunks)):
            if isinstance(chunk, WorkerFailure):
                raise DataError(chunk.message)
            batch = chunk_to_batch(chunk, keys)
            yield batch.pin_memory() if self.pin_memory else batch

    def epoch(self, number: int = 0, units: Optional[Sequence[int]] = None) -> Iterator[Batch]:
        """This rank's batches for epoch `number` (its shuffle), over `units` (None: all; a
        resume under another split reads the rest of an epoch), then padding batches up to the
        epoch's steps."""
        counts, steps = self.deal(units)
        n = 0
        for batch in self.batches(self.cfg.num_workers, number, units):
            n += 1
            self.counters += batch.counters
            yield batch
        if n != counts[self.rank]:
            raise DataError(f"rank {self.rank} read {n} batches, expected {counts[self.rank]}")
        pad = Batch.padding([f.name for f in self.cfg.sparse], len(self.cfg.dense), len(self.cfg.tasks))
        for _ in range(steps - n):
            yield pad
