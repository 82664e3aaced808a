"""Which Parquet columns feed which part of the model: the `[data]` section of a run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from data.transforms import KINDS, DenseTransform


@dataclass
class SparseFeature:
    """One categorical feature: an int64 id column or a list<int64> multi-hot column.

    Ids outside [0, num_embeddings) are handled by `DataConfig.id_policy`.
    """
    name: str
    num_embeddings: int
    column: str = ""  # defaults to `name`

    def __post_init__(self) -> None:
        if not self.column:
            self.column = self.name
        if self.num_embeddings <= 0:
            raise ValueError(f"data.sparse {self.name}: num_embeddings must be > 0")


@dataclass
class Task:
    """One binary task. A null label masks the row out of this task's loss and metrics."""
    name: str
    column: str = ""

    def __post_init__(self) -> None:
        if not self.column:
            self.column = self.name


@dataclass
class DataConfig:
    train: List[str] = field(default_factory=list)  # files, directories or globs
    eval: List[str] = field(default_factory=list)
    sparse: List[SparseFeature] = field(default_factory=list)
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
        names = [f.name for f in self.sparse] + list(self.dense) + [t.name for t in self.tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"data: names used twice: {sorted(dup)}")

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]
