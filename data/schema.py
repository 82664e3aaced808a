"""Which Parquet columns feed which part of the model: the `[data]` section of a run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from data.transforms import KINDS, DenseTransform


POOLINGS = ("sum", "mean")


@dataclass
class SparseFeature:
    """One categorical feature: a column of ids (integers, strings or binaries; one per row,
    or a list per row for a multi-hot feature).

    It looks up its own table of `num_embeddings` rows (dim `model.embedding_dim`, `pooling`),
    or a shared one named by `table` (see `EmbeddingTable`), whose rows it then takes. Integer
    ids outside [0, num_embeddings) are handled by `DataConfig.id_policy`; string ids are hashed.
    """
    name: str
    num_embeddings: int = 0
    column: str = ""  # defaults to `name`
    table: str = ""  # a [[data.tables]] entry shared with other features; "" = a table of its own
    pooling: str = "sum"  # of a multi-hot feature's embeddings (own table only: a shared one has its own)

    def __post_init__(self) -> None:
        if not self.column:
            self.column = self.name
        if not self.table and self.num_embeddings <= 0:
            raise ValueError(f"data.sparse {self.name}: num_embeddings must be > 0 (or name a shared table)")
        _check_rows(f"data.sparse {self.name}", self.num_embeddings)
        if self.pooling not in POOLINGS:
            raise ValueError(f"data.sparse {self.name}: pooling must be one of {POOLINGS}, got {self.pooling!r}")


# 2^47 rows (1.4e14): at dim 16 in fp32 that is 9 PB, beyond any cluster, and far enough below
# int64 that rows x dim x bytes cannot overflow torch's size arithmetic (a traceback otherwise).
MAX_TABLE_ROWS = 2 ** 47


def _check_rows(where: str, rows: int) -> None:
    if rows > MAX_TABLE_ROWS:
        raise ValueError(f"{where}: num_embeddings {rows:.3g} is more than {MAX_TABLE_ROWS:.3g} rows, more than any "
                         f"cluster can hold; hash the ids into fewer rows (data.id_policy = 'hash')")


@dataclass
class EmbeddingTable:
    """`[[data.tables]]`: an embedding table that several features look up (e.g. `item_id` and
    `hist_item_ids` both in `item`), with its own dim (0: model.embedding_dim) and pooling."""
    name: str
    num_embeddings: int
    dim: int = 0
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if self.num_embeddings <= 0 or self.dim < 0:
            raise ValueError(f"data.tables {self.name}: num_embeddings must be > 0 and dim >= 0")
        _check_rows(f"data.tables {self.name}", self.num_embeddings)
        if self.dim % 4:
            raise ValueError(f"data.tables {self.name}: dim {self.dim} is not a multiple of 4 (FBGEMM's "
                             f"embedding kernels need one)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"data.tables {self.name}: pooling must be one of {POOLINGS}, got {self.pooling!r}")


@dataclass
class TableSpec:
    """One embedding table as the model builds it (resolved from the config)."""
    name: str
    num_embeddings: int
    dim: int  # 0: model.embedding_dim
    pooling: str
    features: List[str]


TASK_KINDS = ("binary", "regression")


@dataclass
class Task:
    """One task. binary: labels 0 / 1, BCE loss, NE and AUC; regression: any finite label
    (watch time, a rating), squared-error loss, MSE and MAE. A null label masks the row out of
    the task's loss and metrics. `weight`: a column of per-row weights (>= 0; null: 0) that
    scales the row in the task's loss and metrics."""
    name: str
    column: str = ""
    kind: str = "binary"
    weight: str = ""

    def __post_init__(self) -> None:
        if not self.column:
            self.column = self.name
        if self.kind not in TASK_KINDS:
            raise ValueError(f"data.tasks {self.name}: kind must be one of {TASK_KINDS}, got {self.kind!r}")


@dataclass
class DataConfig:
    train: List[str] = field(default_factory=list)  # files, directories or globs
    eval: List[str] = field(default_factory=list)
    sparse: List[SparseFeature] = field(default_factory=list)
    tables: List[EmbeddingTable] = field(default_factory=list)  # shared tables, see EmbeddingTable
    dense: List[str] = field(default_factory=list)
    tasks: List[Task] = field(default_factory=list)
    batch_size: int = 512  # per rank
    num_workers: int = 1  # DataLoader worker processes per rank (0: read in the main process)
    id_policy: str = "hash"  # "hash": remap out-of-range integer ids (counted); "error": fail
    # dense columns: see data/transforms.py. "auto": as is within [-10, 10], else log1p + standardize
    dense_transform: str = "auto"
    transform: Dict[str, DenseTransform] = field(default_factory=dict)  # per column: [data.transform.COL]
    dense_fill: Optional[float] = None  # a null dense value (counted); None: the mean after the transform
    stats_row_groups: int = 32  # training row groups sampled (evenly) for the transforms' mean / std
    # per epoch, a seeded permutation of each reader's row groups, and of rows within windows of
    # shuffle_buffer rows (0: none); the data position of a step stays exact
    shuffle: bool = False
    shuffle_buffer: int = 0
    shuffle_seed: int = 0
    # +-inf in a dense column (or a float64 beyond float32's range): "error" names the file,
    # row group, column and row; "fill" replaces it by dense_fill and counts it (dense_nonfinite)
    nonfinite: str = "error"
    # tasks whose label (and weight) columns the files do not have: read as unlabelled rows
    # (scoring candidates with `mbrec predict`, which sets it; training refuses a task without labels)
    unlabelled: List[str] = field(default_factory=list)
    # a column grouping the eval rows (a user id, a request id): adds grouped AUC (GAUC) per task
    eval_group: str = ""

    def __post_init__(self) -> None:
        if self.id_policy not in ("hash", "error"):
            raise ValueError(f"data.id_policy must be 'hash' or 'error', got {self.id_policy!r}")
        if self.nonfinite not in ("error", "fill"):
            raise ValueError(f"data.nonfinite must be 'error' or 'fill', got {self.nonfinite!r}")
        if self.dense_transform not in KINDS or not self.dense_transform:
            raise ValueError(f"data.dense_transform must be one of {', '.join(KINDS)}, got {self.dense_transform!r}")
        stray = sorted(set(self.transform) - set(self.dense))
        if stray:
            raise ValueError(f"data.transform: {', '.join(stray)} not in data.dense")
        if self.shuffle_buffer < 0 or self.stats_row_groups < 1:
            raise ValueError("data.shuffle_buffer must be >= 0 and data.stats_row_groups >= 1")
        if self.batch_size <= 0:
            raise ValueError("data.batch_size must be > 0")
        self._bind_tables()
        names = [f.name for f in self.sparse] + list(self.dense) + [t.name for t in self.tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"data: names used twice: {sorted(dup)}")

    def _bind_tables(self) -> None:
        """A feature of a shared table takes the table's rows (the reader hashes into them)."""
        tables = {t.name: t for t in self.tables}
        if len(tables) != len(self.tables):
            raise ValueError("data.tables: a table name is used twice")
        for f in self.sparse:
            if not f.table:
                continue
            if f.table not in tables:
                raise ValueError(f"data.sparse {f.name}: table {f.table!r} is not in data.tables "
                                 f"({', '.join(tables) or 'none'})")
            rows = tables[f.table].num_embeddings
            if f.num_embeddings not in (0, rows):
                raise ValueError(f"data.sparse {f.name}: num_embeddings {f.num_embeddings} differs from its table "
                                 f"{f.table!r} ({rows}); leave it out")
            f.num_embeddings = rows
        clash = sorted(set(tables) & {f.name for f in self.sparse if not f.table})
        if clash:
            raise ValueError(f"data.tables: {', '.join(clash)} is also a feature with a table of its own; rename one")
        unused = sorted(set(tables) - {f.table for f in self.sparse})
        if unused:
            raise ValueError(f"data.tables: {', '.join(unused)} used by no feature")

    def table_specs(self) -> List[TableSpec]:
        """The embedding tables in order: shared ones, then one per feature without a table."""
        specs = [TableSpec(t.name, t.num_embeddings, t.dim, t.pooling, [f.name for f in self.sparse
                                                                        if f.table == t.name]) for t in self.tables]
        specs += [TableSpec(f.name, f.num_embeddings, 0, f.pooling, [f.name]) for f in self.sparse if not f.table]
        return specs

    @property
    def labelled_tasks(self) -> List[Task]:
        """The tasks whose label columns the files have (see `unlabelled`)."""
        return [t for t in self.tasks if t.name not in self.unlabelled]

    @property
    def columns(self) -> List[str]:
        """Every Parquet column the reader decodes."""
        tasks = self.labelled_tasks
        return sorted({f.column for f in self.sparse} | set(self.dense) | {t.column for t in tasks}
                      | {t.weight for t in tasks if t.weight})

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]
