"""`mbrec validate`: a full pre-flight scan of the configured data, for users who want to know
before a long job what a run would only find when it reaches a bad row group. Every row group
of data.train and data.eval is decoded exactly as training decodes it (same checks, same
policies), in parallel worker processes; every error is reported (one per row group), not
only the first, with per-task label counts and the reader's counters."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence, Tuple

import numpy as np

from data.batch import COUNTERS
from data.errors import DataError
from data.footers import read_footers
from data.reader import ChunkDecoder
from data.schema import DataConfig
from data.storage import open_parquet
from data.transforms import FittedTransforms


def _scan_unit(args: Tuple[DataConfig, FittedTransforms, str, int]) -> Tuple[str, np.ndarray, np.ndarray]:
    """One row group -> (error message or "", counters [C], label counts [2, M])."""
    cfg, transforms, path, rg = args
    columns = cfg.columns
    labels = np.zeros((2, len(cfg.tasks)), np.int64)
    try:
        table = open_parquet(path).read_row_group(rg, columns=columns)
        chunk = ChunkDecoder(cfg, transforms).decode(table, path, rg)
    except DataError as e:
        return str(e), np.zeros(len(COUNTERS), np.int64), labels
    except OSError as e:
        return f"{path}: row group {rg}: cannot read: {e}", np.zeros(len(COUNTERS), np.int64), labels
    labelled = chunk.mask > 0  # [R, M] (mask holds weights)
    labels[0] = labelled.sum(0)
    labels[1] = ((chunk.labels > 0) & labelled).sum(0)
    return "", chunk.counters, labels


def scan(cfg: DataConfig, patterns: Sequence[str], workers: int, transforms: FittedTransforms) -> Dict:
    """{files, row_groups, errors: [...], counters: {...}, tasks: {name: {labelled, positive}}}.
    `transforms`: the training split's (see data.reader.fit_transforms)."""
    footers = read_footers(patterns, cfg)  # schemas: the first bad file stops here, naming it
    files = footers.files
    units = [(cfg, transforms, f, rg) for f, rg in footers.units]
    errors: List[str] = []
    counters = np.zeros(len(COUNTERS), np.int64)
    labels = np.zeros((2, len(cfg.tasks)), np.int64)
    # spawn: the parent has pyarrow thread pools (footers read), which do not survive a fork
    with ProcessPoolExecutor(max(workers, 1), mp_context=mp.get_context("spawn")) as pool:
        for err, c, lab in pool.map(_scan_unit, units, chunksize=max(1, len(units) // (8 * max(workers, 1)))):
            if err:
                errors.append(err)
            counters += c
            labels += lab
    return {"files": len(files), "row_groups": len(units), "errors": errors,
            "counters": dict(zip(COUNTERS, counters.tolist())),
            "tasks": {t.name: {"labelled": int(labels[0, m]), "positive": int(labels[1, m])}
                      for m, t in enumerate(cfg.tasks)}}


def problems(result: Dict) -> List[str]:
    """Warnings a scan's result implies: tasks without labels or of one class."""
    out = []
    for name, c in result["tasks"].items():
        if c["labelled"] == 0:
            out.append(f"task {name!r}: no labelled row")
        elif c["positive"] in (0, c["labelled"]):
            out.append(f"task {name!r}: every label is {int(c['positive'] > 0)} ({c['labelled']} rows)")
    return out
