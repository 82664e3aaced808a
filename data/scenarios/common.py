"""Pieces shared by the synthetic scenarios: power-law ids, multi-hot lists, the link."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pyarrow as pa


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def zipf_ids(rng: np.random.Generator, n: int, card: int, a: float, perm: np.ndarray) -> np.ndarray:
    """Power-law ids in [0, card): rank k drawn with probability ~ k^-a, then a fixed
    permutation so that frequent ids are spread over the table."""
    p = np.arange(1, card + 1, dtype=np.float64) ** -a
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), card - 1)
    return perm[ranks]


def multi_hot(rng: np.random.Generator, n: int, mean_len: int, table: np.ndarray, a: float,
              perm: np.ndarray) -> Tuple[pa.Array, np.ndarray]:
    """A list column of Poisson(mean_len) power-law ids per row, and the mean of their rows of
    `table` [card, K] per row ([n, K]; 0 for an empty list)."""
    lengths = rng.poisson(mean_len, n)
    ids = zipf_ids(rng, int(lengths.sum()), table.shape[0], a, perm)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cs = np.vstack([np.zeros((1, table.shape[1])), np.cumsum(table[ids], axis=0)])  # segment sums
    sums = cs[offsets[1:]] - cs[offsets[:-1]]
    column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
    return column, sums / np.maximum(lengths, 1)[:, None]


def dense_columns(rng: np.random.Generator, d: np.ndarray, nullable: int, null_rate: float):
    """Arrow columns d0.. of the dense truth d [n, num], with `null_rate` nulls in the first
    `nullable` (the truth keeps the value before it was nulled)."""
    n, num = d.shape
    cols = {}
    for j in range(num):
        nulls = (rng.random(n) < null_rate) if j < nullable else np.zeros(n, bool)
        cols[f"d{j}"] = pa.array(d[:, j].astype(np.float32), pa.float32(), mask=nulls)
    return cols
