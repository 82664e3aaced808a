"""Dense feature transforms: raw numeric columns as logs hold them (counts up to 1e5, years
near 2000, prices) made fit for a network, the same way in training, eval and after a resume.

Per column, in this order (x is a raw value, float32):
    clip:        x = min(max(x, lo), hi)                      (if `clip = [lo, hi]`)
    log1p:       x = sign(x) * log(1 + |x|)                   (kinds "log1p", "log1p_standardize")
    standardize: x = (x - mean) / std                         (kinds "standardize", "log1p_standardize")
    null:        x = fill                                     (after the transform)
mean / std (of the clipped, logged value) come from a statistics pass over a sample of the
training row groups (`data.stats_row_groups`, spread evenly), made once per run and saved
with it (`OUT/dense_stats.json`), so eval and resume use the same numbers.

The default kind, "auto", looks at the column's range in the Parquet footers: a column within
[-10, 10] is taken as already scaled and fed as is; any other is log1p'd and standardized (a
count of 0..99,999 becomes about N(0, 1); so does a year, whose log is nearly linear over its
narrow range). The default fill is the mean after the transform (0 for standardized columns),
or `data.dense_fill` where that is set.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)
KINDS = ("none", "log1p", "standardize", "log1p_standardize", "auto")
AUTO_RANGE = 10.0  # "auto": a column within [-AUTO_RANGE, AUTO_RANGE] is fed as is
EXTREME = 1e3  # a column fed as is beyond this magnitude gets a warning


@dataclass
class DenseTransform:
    """`[data.transform.COLUMN]`: how one dense column is transformed."""
    kind: str = ""  # one of KINDS; "" takes data.dense_transform
    clip: List[float] = field(default_factory=list)  # [lo, hi] on the raw value, or empty
    fill: Optional[float] = None  # a null's value after the transform; None: the mean after it

    def __post_init__(self) -> None:
        if self.kind and self.kind not in KINDS:
            raise ValueError(f"data.transform: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.clip and (len(self.clip) != 2 or not self.clip[0] < self.clip[1]):
            raise ValueError(f"data.transform: clip must be [lo, hi] with lo < hi, got {self.clip}")


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class FittedTransforms:
    """Resolved kinds and fitted numbers for the D dense columns (what dense_stats.json holds)."""
    columns: List[str]
    kinds: List[str]  # no "auto"
    clip: List[Optional[List[float]]]
    mean: List[float]
    std: List[float]
    fill: List[float]

    def __post_init__(self) -> None:
        d = len(self.columns)
        self._lo = np.array([c[0] if c else -np.inf for c in self.clip], np.float32)  # [D]
        self._hi = np.array([c[1] if c else np.inf for c in self.clip], np.float32)
        self._log = np.array(["log1p" in k for k in self.kinds], bool)
        std = ["standardize" in k for k in self.kinds]
        self._shift = np.array([m if s else 0.0 for m, s in zip(self.mean, std)], np.float32)
        self._scale = np.array([1.0 / sd if s else 1.0 for sd, s in zip(self.std, std)], np.float32)
        self._fill = np.array(self.fill, np.float32).reshape(1, d)
        self._identity = not any(self.clip) and not self._log.any() and not any(std)

    def apply(self, dense: np.ndarray) -> int:
        """In place on [R, D] float32 with NaN for nulls; returns how many nulls it filled."""
        if not self._identity:
            np.clip(dense, self._lo, self._hi, out=dense)
            if self._log.any():
                dense[:, self._log] = signed_log1p(dense[:, self._log])
            dense -= self._shift
            dense *= self._scale
        nan = np.isnan(dense)
        filled = int(np.count_nonzero(nan))
        if filled:
            np.copyto(dense, np.broadcast_to(self._fill, dense.shape), where=nan)
        return filled

    def describe(self) -> str:
        return ", ".join(f"{c}: {k}" + (f" (mean {m:.4g}, std {sd:.4g})" if "standardize" in k else "")
                         for c, k, m, sd in zip(self.columns, self.kinds, self.mean, self.std)) or "none"

    def to_dict(self) -> Dict:
        return {k: getattr(self, k) for k in ("columns", "kinds", "clip", "mean", "std", "fill")}


def resolve_kind(column: str, kind: str, footer_range: Optional[Tuple[float, float]],
                 sample_range: Tuple[float, float]) -> str:
    """"auto" -> "none" or "log1p_standardize" from the column's range (footers, else the sample)."""
    lo, hi = footer_range if footer_range is not None else sample_range
    if kind == "auto":
        return "none" if max(abs(lo), abs(hi)) <= AUTO_RANGE else "log1p_standardize"
    if kind == "none" and max(abs(lo), abs(hi)) > EXTREME:
        log.warning("dense column %r ranges over [%g, %g] and is fed as is (transform 'none'): a network "
                    "trains badly on raw magnitudes like these; consider 'log1p_standardize'", column, lo, hi)
    return kind


def fit(columns: Sequence[str], options: Dict[str, DenseTransform], default_kind: str,
        default_fill: Optional[float], sample: np.ndarray,
        footer_ranges: Dict[str, Tuple[float, float]]) -> FittedTransforms:
    """Kinds and numbers from a sample [N, D] of raw values (NaN where null)."""
    kinds, clips, means, stds, fills = [], [], [], [], []
    for j, column in enumerate(columns):
        opt = options.get(column, DenseTransform())
        x = sample[:, j][np.isfinite(sample[:, j])].astype(np.float64)
        rng = (float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)
        kind = resolve_kind(column, opt.kind or default_kind, footer_ranges.get(column), rng)
        if opt.clip:
            x = np.clip(x, *opt.clip)
        if "log1p" in kind:
            x = signed_log1p(x)
        mean = float(x.mean()) if len(x) else 0.0
        std = float(x.std()) if len(x) > 1 else 0.0
        std = std if std > 0 and math.isfinite(std) else 1.0  # a constant column stays constant
        after = 0.0 if "standardize" in kind else mean  # the mean after the transform
        fill = opt.fill if opt.fill is not None else default_fill if default_fill is not None else after
        kinds.append(kind), clips.append(list(opt.clip) or None), means.append(mean), stds.append(std)
        fills.append(float(fill))
    return FittedTransforms(list(columns), kinds, clips, means, stds, fills)


def needs_sample(columns: Sequence[str], options: Dict[str, DenseTransform], default_kind: str,
                 default_fill: Optional[float], footer_ranges: Dict[str, Tuple[float, float]]) -> bool:
    """False when nothing to fit: every column as is (known from the footers) with a set fill."""
    for column in columns:
        opt = options.get(column, DenseTransform())
        kind = opt.kind or default_kind
        if kind == "auto" and column in footer_ranges:
            kind = resolve_kind(column, kind, footer_ranges[column], (0.0, 0.0))
        if kind != "none" or (opt.fill is None and default_fill is None):
            return True
    return False
