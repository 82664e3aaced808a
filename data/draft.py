"""`mbrec schema PATH...`: a ready `[data]` section drafted from Parquet logs as they are.

Reads every footer (rows) and a sample of row groups (values), then guesses each column's role:
- lists of ids, strings, binaries, and integer columns named like ids -> sparse features, with
  tables large enough that under 1 % of the estimated distinct values share a row with another
  (`table_rows`; integer ids within the table map to themselves and never collide), up to
  MAX_TABLE_ROWS; each line gives the expected share. Columns with one distinct value per row
  (row identifiers) are listed as not used;
- columns whose values are all 0 / 1 (or null) -> tasks (a 0/1 *feature* is left for the user
  to move: the draft says so);
- integer columns with few values (CODE_DISTINCT) whose name does not read as a quantity -> codes,
  sparse; other integer columns (ages, counts, weeks worked) are quantities, dense;
- other numeric columns -> dense, with the transform "auto" will choose from their range.
The draft is a starting point printed with its evidence, not a verdict: read the comments.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import DataError
from data.footers import id_value_type, is_string_like, spread
from data.storage import open_parquet, resolve_files
from data.transforms import AUTO_RANGE

TIME_NAME = re.compile(r"(^|_)(time|timestamp|ts|date|datetime|dt|day|epoch)(_|$)|_at$|_time$|_ts$", re.I)
EPOCH_RANGES = ((1e9, 2.2e9, "epoch seconds"), (1e12, 2.2e12, "epoch milliseconds"), (19000101, 21001231, "dates"))
# an integer column (not named like an id) is a categorical code when it has at most CODE_DISTINCT
# distinct values, all in [0, 1000), and its name does not read as a quantity (QUANTITY_NAME);
# otherwise it is a quantity, dense: its order and distances carry meaning a code's table loses
CODE_DISTINCT = 16
QUANTITY_NAME = re.compile(r"(^|[_\- ])(age|num|number|count|cnt|qty|quantity|amount|weeks?|days?|hours?|years?|"
                           r"months?|minutes?|seconds?|size|length|total|price|cost|income|salary|wage|employees?|"
                           r"persons?)([_\- ]|$)|^n_", re.I)
ID_NAME = re.compile(r"(^|_)(id|ids|uid|key|hash|code|token|category|cat)(_|$)|_id$|^id_", re.I)
SAMPLE_ROW_GROUPS = 8
MAX_TABLE_ROWS = 50_000_000  # a draft never proposes more rows than this per table
TARGET_COLLISIONS = 0.01  # the share of distinct values a drafted table lets share a row


@dataclass
class Column:
    name: str
    role: str  # "sparse" | "dense" | "task" | "skip"
    note: str
    num_embeddings: int = 0


def estimate_distinct(distinct: int, sampled: int, total: int) -> int:
    """The distinct ids of the whole data from `distinct` ids in `sampled` of `total` rows: the
    vocabulary is extrapolated linearly when most sampled ids were new (distinct > sampled / 2),
    else taken as mostly seen (x1.25)."""
    return int(distinct * total / max(sampled, 1) if distinct > sampled / 2 else math.ceil(1.25 * distinct))


def colliding_share(distinct: int, rows: int) -> float:
    """Expected share of `distinct` values hashed into `rows` rows that share their row with
    another value: 1 - (1 - 1/rows)^(distinct - 1)."""
    return -math.expm1((distinct - 1) * math.log1p(-1 / rows)) if distinct > 1 and rows > 1 else float(distinct > 1)


def table_rows(distinct: int, sampled: int, total: int, max_id: int = -1) -> int:
    """Rows for a table that saw `distinct` ids in `sampled` of `total` rows: enough that under
    TARGET_COLLISIONS of the estimated vocabulary share a row. Integer ids all >= 0 (`max_id` >= 0)
    whose largest is under 10 x that size get 1.25 x (max_id + 1) rows instead: every id seen maps
    to itself, without collision, with room for new ones (sparser id spaces are hashed). Capped
    at MAX_TABLE_ROWS."""
    d = estimate_distinct(distinct, sampled, total)
    # the smallest n with (1 - 1/n)^(d - 1) >= 1 - TARGET_COLLISIONS (see colliding_share)
    rows = math.ceil(-1 / math.expm1(math.log1p(-TARGET_COLLISIONS) / (d - 1))) if d > 1 else 16
    if 0 <= max_id < 10 * rows:  # every id seen fits as it is
        rows = math.ceil(1.25 * (max_id + 1))
    return int(min(max(rows, 16), MAX_TABLE_ROWS))


def _sparse_note(what: str, distinct: int, sampled: int, total: int, rows: int, max_id: int = -1) -> str:
    d = estimate_distinct(distinct, sampled, total)
    share = 0.0 if 0 <= max_id < rows else colliding_share(d, rows)  # (ids in [0, rows) never collide)
    return f"{what}, {distinct:,} distinct in {sampled:,} sampled ids (about {d:,} in all): {share:.2%} expected to share a row"


def _row_identifier(distinct: int, sampled: int, is_list: bool) -> bool:
    """Nearly one distinct value per row in a sample of >= 1,000 rows (a title, an event id):
    an embedding per row memorises the training labels and gives eval rows noise."""
    return not is_list and sampled >= 1000 and distinct > 0.9 * sampled


def _classify(name: str, col: pa.ChunkedArray, total: int) -> Column:
    tp = col.type
    vt = id_value_type(tp)
    is_list = pa.types.is_list(tp) or pa.types.is_large_list(tp)
    flat = pc.list_flatten(col) if is_list else col
    if is_list or is_string_like(vt) or pa.types.is_dictionary(tp):
        if not (pa.types.is_integer(vt) or is_string_like(vt)):
            return Column(name, "skip", f"{tp}: not an id type")
        distinct = pc.count_distinct(flat).as_py()
        if _row_identifier(distinct, len(flat), is_list):
            return Column(name, "skip", f"{tp}, {distinct:,} distinct in {len(flat):,} rows: one value per row, an "
                                        f"identifier of the row rather than a feature (add it if its ids repeat)")
        ids_total = total * max(len(flat), 1) // max(len(col), 1)
        max_id = _max_id(flat) if pa.types.is_integer(vt) else -1
        n = table_rows(distinct, len(flat), ids_total, max_id)
        return Column(name, "sparse", _sparse_note(str(tp), distinct, len(flat), ids_total, n, max_id), n)
    if pa.types.is_timestamp(tp) or pa.types.is_date(tp):
        return Column(name, "skip", f"{tp}: a time column; under a time split every eval value lies beyond the "
                                    f"training range: not used (derive hour / weekday features from it)")
    if not (pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp)):
        return Column(name, "skip", f"{tp}: not used (no role for this type)")
    values = col.drop_null().cast(pa.float64()).to_numpy()
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Column(name, "skip", "no values in the sample")
    lo, hi = float(values.min()), float(values.max())
    when = _time_like(name, tp, lo, hi)
    if when:
        return Column(name, "skip", f"{tp} in [{lo:g}, {hi:g}]: looks like a time column ({when}); under a time split "
                                    f"every eval value lies beyond the training range: not used (derive hour / weekday "
                                    f"features from it, or add it as dense on purpose)")
    if np.isin(values, (0.0, 1.0)).all():
        return Column(name, "task", f"0/1, {values.mean():.3%} positive, {_nulls(col)} "
                                    f"(a 0/1 feature? move it to dense)")
    if pa.types.is_integer(tp) and ID_NAME.search(name):
        distinct = pc.count_distinct(col).as_py()
        if _row_identifier(distinct, len(col), False):
            return Column(name, "skip", f"{tp}, {distinct:,} distinct in {len(col):,} rows: one value per row, an "
                                        f"identifier of the row rather than a feature (add it if its ids repeat)")
        max_id = _max_id(col)
        n = table_rows(distinct, len(col), total, max_id)
        return Column(name, "sparse", _sparse_note(f"{tp} named like an id", distinct, len(col), total, n, max_id), n)
    if pa.types.is_integer(tp):
        distinct = pc.count_distinct(col).as_py()
        if distinct <= CODE_DISTINCT and lo >= 0 and hi < 1000 and not QUANTITY_NAME.search(name):
            n = table_rows(distinct, len(col), total, int(hi))
            return Column(name, "sparse", _sparse_note(f"{tp} with {distinct} distinct values in [{lo:g}, {hi:g}]: a code, "
                                                       f"not a quantity (move it to dense if its order matters)",
                                                       distinct, len(col), total, n, int(hi)), n)
    auto = "as is" if max(abs(lo), abs(hi)) <= AUTO_RANGE else "log1p + standardize"
    why = ""
    if pa.types.is_integer(tp):
        distinct = pc.count_distinct(col).as_py()
        why = (f", {distinct} distinct: a quantity" + (" by its name" if QUANTITY_NAME.search(name) else "")
               + " (move it to sparse if it is a category)")
    return Column(name, "dense", f"{tp} in [{lo:g}, {hi:g}], {_nulls(col)}{why}: auto = {auto}")


def _nulls(col: pa.ChunkedArray) -> str:
    """The sample's nulls, counted (a share rounded to 0 % would hide them)."""
    return f"{col.null_count:,} null ({col.null_count / len(col):.2%})" if col.null_count else "no null"


def _time_like(name: str, tp: pa.DataType, lo: float, hi: float) -> str:
    """Why a numeric column looks like a time (its name, or a range of epoch times or dates), or ""."""
    for a, b, what in EPOCH_RANGES:
        if a <= lo <= hi <= b:
            return f"a range of {what}" + (", and its name" if TIME_NAME.search(name) else "")
    return "its name" if TIME_NAME.search(name) and hi - lo > 1000 else ""


def _max_id(ids) -> int:
    """The largest of integer ids that are all >= 0, else -1 (negative ids are hashed)."""
    lo, hi = pc.min_max(ids.cast(pa.int64()) if pa.types.is_dictionary(ids.type) else ids).values()
    return int(hi.as_py()) if lo.as_py() is not None and lo.as_py() >= 0 else -1


def run_name(patterns: Sequence[str]) -> str:
    """A drafted run's directory name: the data's folder or file name and a digest of every path
    drafted from (two datasets in folders of one name, say `train/`, get two runs)."""
    first = patterns[0].rstrip("/").split("?")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", first.rsplit("/", 1)[-1].split("*")[0]).strip("._-")
    stem = re.sub(r"\.parquet$", "", stem) or "drafted"
    full = [p if "://" in p else os.path.abspath(p) for p in patterns]
    return f"{stem}-{hashlib.sha256(json.dumps(full).encode()).hexdigest()[:6]}"


def draft(patterns: Sequence[str]) -> str:
    """The `[data]` section (TOML text with comments) for the files the patterns name."""
    files = resolve_files(patterns)
    metas = []
    for f in files:
        try:
            metas.append(open_parquet(f).metadata)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: cannot read as Parquet: {e}") from e
    if not any(m.num_row_groups for m in metas):
        raise DataError(f"{', '.join(files[:3])}: no row groups to sample (the files hold no rows)")
    total = sum(m.num_rows for m in metas)
    units = [(f, i) for f, m in zip(files, metas) for i in range(m.num_row_groups)]
    try:
        sample = pa.concat_tables([open_parquet(units[i][0]).read_row_group(units[i][1])
                                   for i in spread(len(units), SAMPLE_ROW_GROUPS)], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{patterns[0]}: the files' schemas do not combine ({e}); draft one schema at a time") from e
    cols = [_classify(name, sample.column(name), total) for name in sample.column_names]
    columns = [set(m.schema.to_arrow_schema().names) for m in metas]  # (top-level: a list column's leaf is not)
    for c in cols:  # a column some files lack reads as nulls there: said, with the files
        lacking = [f for f, names in zip(files, columns) if c.name not in names]
        if lacking:
            c.note += (f"; ABSENT from {len(lacking)} of {len(files)} file(s) ({', '.join(lacking[:3])}"
                       f"{' ...' if len(lacking) > 3 else ''}): its nulls there are the files', not the data's")
    return _format(patterns, len(files), total, sample.num_rows, cols)


def _q(text: str) -> str:
    """A TOML basic string (JSON's escaping is TOML's for these): any column name or path."""
    return json.dumps(text, ensure_ascii=False)


def _format(patterns: Sequence[str], nfiles: int, total: int, sampled: int, cols: List[Column]) -> str:
    by = {r: [c for c in cols if c.role == r] for r in ("sparse", "dense", "task", "skip")}
    quoted = ", ".join(_q(p) for p in patterns)
    out = [f"# drafted by `mbrec schema` from {nfiles} file(s), {total:,} rows ({sampled:,} sampled): check the roles",
           "[data]", f"train = [{quoted}]", f"eval = [{quoted}]  # replace by a held-out split",
           'dense_transform = "auto"  # as is within [-10, 10], else log1p + standardize (data/transforms.py)',
           "shuffle = true  # training reads its row groups in a new order every epoch (the default is false)",
           "dense = ["]
    out += [f'  {_q(c.name)},  # {c.note}' for c in by["dense"]]
    out += ["]", "sparse = ["]
    out += [f'  {{ name = {_q(c.name)}, num_embeddings = {c.num_embeddings:_} }},  # {c.note}' for c in by["sparse"]]
    out += ["]", "tasks = ["]
    out += [f'  {{ name = {_q(c.name)} }},  # {c.note}' for c in by["task"]]
    out += ["]"]
    out += [f"# not used: {c.name} ({c.note})".replace("\n", " ") for c in by["skip"]]
    return "\n".join(out) + "\n"
