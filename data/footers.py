"""What a split's Parquet footers say, read once per job: the files, their row groups, schema
checks against the config, label statistics and per-column min / max.

In a distributed run one rank reads the footers (in parallel threads: remote footers are one
round trip each) and the trainer broadcasts the result, so 10k files and 512 ranks cost 10k
footer reads, not 5M. `Footers` is small and picklable for that reason.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from data.errors import DataError
from data.schema import DataConfig
from data.storage import open_parquet, resolve_files

FOOTER_THREADS = 16


def spread(n: int, k: int) -> List[int]:
    """Up to k indices of range(n), evenly spread (first and last included): the row groups a
    sample reads."""
    import numpy as np
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))}) if n else []


def is_string_like(tp: pa.DataType) -> bool:
    return (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp)
            or pa.types.is_large_binary(tp) or pa.types.is_fixed_size_binary(tp))


def id_value_type(tp: pa.DataType) -> pa.DataType:
    """The type of one id in an id column: through lists and dictionary encoding."""
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        tp = tp.value_type
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return tp


def type_problem(column: str, tp: pa.DataType, role: str) -> Optional[str]:
    """None if a column of type `tp` can play `role`, else what is wrong with it."""
    numeric = pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp)
    if role == "data.eval_group":  # one group per row: a user or request id, never a list
        v = tp.value_type if pa.types.is_dictionary(tp) else tp
        if pa.types.is_integer(v) or is_string_like(v):
            return None
        want = "one integer or string/binary id per row (a user or request column; a list cannot group rows)"
    elif role == "sparse":  # ids: integers or strings
        v = id_value_type(tp)
        if pa.types.is_integer(v) or is_string_like(v):
            return None
        want = "integer or string/binary ids (or lists of them)"
    elif numeric:
        return None
    else:
        want = {"dense": "a numeric column", "label": "a numeric label column"}.get(role, "a numeric column")
    return f"column {column!r} ({role}) has type {tp}; expected {want}"


@dataclass
class LabelFooters:
    """Per task, what the Parquet footer statistics say of its labels (-1: a footer lacks them).
    labelled: rows minus nulls (NaN labels, also unlabelled, are not counted by footers);
    positive: 1 if some row group's maximum is > 0, 0 if every maximum is 0."""
    labelled: List[int]
    positive: List[int]


@dataclass
class Footers:
    files: List[str]
    row_groups: List[int]  # per file
    unit_rows: List[int]  # per (file, row group), in file order
    labels: LabelFooters
    # column -> (min, max) over every row group whose footer has statistics (numeric columns)
    ranges: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    types: Dict[str, str] = field(default_factory=dict)  # column -> Arrow type, as in the files
    string_ids: List[str] = field(default_factory=list)  # sparse columns of string / binary ids

    @property
    def units(self) -> List[Tuple[str, int]]:
        """(file, row group) pairs in global order."""
        return [(f, i) for f, n in zip(self.files, self.row_groups) for i in range(n)]


def _wanted(cfg: DataConfig) -> List[Tuple[str, str]]:
    return ([(f.column, "sparse") for f in cfg.sparse] + [(c, "dense") for c in cfg.dense]
            + [(t.column, "label") for t in cfg.labelled_tasks] + [(t.weight, "weight") for t in cfg.labelled_tasks
                                                                    if t.weight])


def _one_file(path: str, wanted: List[Tuple[str, str]]) -> Dict:
    """Footer of one file -> what `read_footers` needs (computed in a thread)."""
    try:
        meta = open_parquet(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    schema = meta.schema.to_arrow_schema()
    problems = []
    for column, role in wanted:
        if schema.get_field_index(column) < 0:
            problems.append(f"missing column {column!r} ({role})")
        else:
            p = type_problem(column, schema.field(column).type, role)
            problems += [p] if p else []
    if problems:  # every bad column at once
        raise DataError(f"{path}: {'; '.join(problems)} (the file has: {', '.join(schema.names)})")
    stats: Dict[str, List[Tuple]] = {}
    for column, _ in wanted:
        j = schema.get_field_index(column)
        if schema.field(column).type.num_fields or j >= meta.num_columns:
            continue  # nested (lists): no per-value statistics used
        col = []
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(j).statistics
            col.append((meta.row_group(i).num_rows, st.null_count if st is not None and st.has_null_count else None,
                        (st.min, st.max) if st is not None and st.has_min_max else None))
        stats[column] = col
    return {"rows": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)], "stats": stats,
            "types": {c: str(schema.field(c).type) for c, _ in wanted},
            "kinds": {c: value_kind(schema.field(c).type, role) for c, role in wanted},
            "string_ids": sorted({c for c, role in wanted if role == "sparse"
                                  and is_string_like(id_value_type(schema.field(c).type))})}


def _label_footers(per_file: List[Dict], cfg: DataConfig) -> LabelFooters:
    out = LabelFooters([0] * len(cfg.tasks), [0] * len(cfg.tasks))
    for f in per_file:
        for m, task in enumerate(cfg.tasks):
            for rows, nulls, mm in f["stats"].get(task.column, []):
                out.labelled[m] = -1 if nulls is None or out.labelled[m] < 0 else out.labelled[m] + rows - nulls
                if mm is not None:
                    out.positive[m] = 1 if mm[1] > 0 else out.positive[m]
                elif nulls != rows and out.positive[m] == 0:  # values but no statistics: unknown
                    out.positive[m] = -1
    return out


def _ranges(per_file: List[Dict]) -> Dict[str, Tuple[float, float]]:
    out: Dict[str, Tuple[float, float]] = {}
    for f in per_file:
        for column, groups in f["stats"].items():
            for _, _, mm in groups:
                if mm is None or isinstance(mm[0], (str, bytes)):
                    continue
                lo, hi = out.get(column, (float("inf"), float("-inf")))
                out[column] = (min(lo, float(mm[0])), max(hi, float(mm[1])))
    return out


def value_kind(tp: pa.DataType, role: str) -> str:
    """What a column's values are to the reader: for ids, integers or strings (through lists and
    dictionary encoding; int32 and int64, string and large_string, plain and dictionary read
    alike); for other roles, numbers."""
    if role != "sparse":
        return "number"
    v = id_value_type(tp)
    kind = "string" if is_string_like(v) else "integer" if pa.types.is_integer(v) else str(v)
    return f"list of {kind}" if pa.types.is_list(tp) or pa.types.is_large_list(tp) else kind


def _same_types(files: Sequence[str], per_file: List[Dict]) -> Dict[str, str]:
    """A column must hold one kind of values in every file (an id 123 and an id "123" hash
    differently); physical types that read alike (int32 / int64, string / large_string,
    dictionary / plain) may differ."""
    first: Dict[str, Tuple[str, str, str]] = {}
    for path, f in zip(files, per_file):
        for column, tp in f["types"].items():
            kind = f["kinds"][column]
            seen = first.setdefault(column, (kind, tp, path))
            if seen[0] != kind:
                raise DataError(f"column {column!r} holds {seen[0]} ({seen[1]}) in {seen[2]} but {kind} ({tp}) in "
                                f"{path}: rewrite the files with one kind of values")
    return {c: t for c, (_, t, _) in first.items()}


def read_footers(patterns: Sequence[str], cfg: DataConfig, threads: int = FOOTER_THREADS,
                 extra: Sequence[Tuple[str, str]] = ()) -> Footers:
    """Resolves the patterns and reads every file's footer (only the footers). `extra`: more
    (column, role) pairs the files must have (eval's grouping column)."""
    files = resolve_files(patterns)
    wanted = _wanted(cfg) + list(extra)
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        per_file = list(pool.map(lambda p: _one_file(p, wanted), files))
    types = _same_types(files, per_file)
    return Footers(files, [len(f["rows"]) for f in per_file], [r for f in per_file for r in f["rows"]],
                   _label_footers(per_file, cfg), _ranges(per_file), types,
                   per_file[0]["string_ids"] if per_file else [])  # (one type per column: checked)
