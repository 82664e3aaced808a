"""`mbrec bench-data`: the Parquet reader's rows/s per worker process, next to pyarrow's raw
decode of the same columns of the same files, in one run (one process each, sequentially).
Files may be anywhere `data.storage` reads (s3:// included); `--as-strings` measures a copy
of the training files whose id columns are strings (the reader hashes them)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.reader import DataSource
from data.schema import DataConfig
from data.storage import open_parquet


def raw_decode_rate(src: DataSource) -> float:
    """rows/s of pyarrow reading the configured columns, row group by row group, to Arrow."""
    columns = src.dataset().columns
    t0, rows = time.perf_counter(), 0
    for path in src.files:
        f = open_parquet(path)
        for i in range(f.num_row_groups):
            rows += f.read_row_group(i, columns=columns).num_rows
    return rows / (time.perf_counter() - t0)


def raw_numpy_rate(src: DataSource) -> float:
    """rows/s of pyarrow decode plus conversion of every column to numpy (the least any
    reader that hands tensors to a model must do)."""
    columns = src.dataset().columns
    t0, rows = time.perf_counter(), 0
    for path in src.files:
        f = open_parquet(path)
        for i in range(f.num_row_groups):
            t = f.read_row_group(i, columns=columns)
            for c in t.columns:
                c.combine_chunks().flatten() if hasattr(c.type, "value_type") else c.to_numpy()
            rows += t.num_rows
    return rows / (time.perf_counter() - t0)


def reader_rate(src: DataSource, workers: int) -> float:
    """rows/s of Batches out of the reader with `workers` DataLoader processes (0: in-process)."""
    t0, rows = time.perf_counter(), 0
    for batch in src.batches(workers):
        rows += batch.dense_features.shape[0]
    return rows / (time.perf_counter() - t0)


def _as_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An id column with its ids as strings ("user-123"), lists kept as lists."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return pa.chunked_array([pa.ListArray.from_arrays(c.offsets, pc.binary_join_element_wise(
            "id-", c.values.cast(pa.string()), "")) for c in col.chunks], pa.list_(pa.string()))
    return pc.binary_join_element_wise("id-", col.cast(pa.string()), "")


def strings_copy(cfg: DataConfig, out_dir: str) -> DataConfig:
    """The training files rewritten with string ids (same row groups), for `--as-strings`."""
    src = DataSource(cfg.train, cfg, 0, 1)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ids = {f.column for f in cfg.sparse}
    for n, path in enumerate(src.files):
        f = open_parquet(path)
        with pq.ParquetWriter(Path(out_dir) / f"part-{n:05d}.parquet", _string_schema(f.schema_arrow, ids)) as w:
            for i in range(f.num_row_groups):
                t = f.read_row_group(i)
                w.write_table(pa.table([_as_strings(t[c]) if c in ids else t[c] for c in t.column_names],
                                       names=t.column_names))
    return dataclasses.replace(cfg, train=[out_dir])


def _string_schema(schema: pa.Schema, ids: set) -> pa.Schema:
    out = []
    for field in schema:
        if field.name in ids:
            is_list = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
            field = field.with_type(pa.list_(pa.string()) if is_list else pa.string())
        out.append(field)
    return pa.schema(out)


def run(cfg: DataConfig, workers: int, rounds: int = 2) -> Dict[str, float]:
    """Best of `rounds` for each rate; the rounds alternate pyarrow and the reader, so a
    machine whose speed drifts moves both alike (the paired ratio is the median of the
    same-round ratios)."""
    single = DataConfig(**{**cfg.__dict__, "num_workers": 1})
    src = DataSource(cfg.train, single, 0, 1)
    timed: Dict[str, Callable[[], float]] = {"pyarrow_decode": lambda: raw_decode_rate(src),
                                             "pyarrow_decode_to_numpy": lambda: raw_numpy_rate(src),
                                             "reader_1_process": lambda: reader_rate(src, 0)}
    if workers > 1:
        multi = DataSource(cfg.train, DataConfig(**{**cfg.__dict__, "num_workers": workers}), 0, 1)
        timed[f"reader_{workers}_workers"] = lambda: reader_rate(multi, workers)
    rates: Dict[str, List[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            rates[name].append(fn())
    out: Dict[str, float] = {"rows": src.rows, **{k: max(v) for k, v in rates.items()}}
    out["reader_vs_pyarrow_decode"] = out["reader_1_process"] / out["pyarrow_decode"]
    out["reader_vs_pyarrow_decode_paired"] = statistics.median(
        r / d for r, d in zip(rates["reader_1_process"], rates["pyarrow_decode"]))
    out["processes_for_1M_rows_per_s"] = 1e6 / out["reader_1_process"]
    return out


def format_table(r: Dict[str, float]) -> str:
    lines = [f"{r['rows']} rows, one process each unless stated"]
    for k, v in r.items():
        if k == "rows":
            continue
        unit = "rows/s" if not k.startswith(("reader_vs", "processes")) else ""
        lines.append(f"{k:<34}{v:>14,.2f} {unit}" if unit == "" else f"{k:<34}{v:>14,.0f} {unit}")
    return "\n".join(lines)
