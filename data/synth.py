"""The built-in synthetic click logs (`mbrec synth`): known generative models, fixed in
`data/scenarios/` and not tuned per experiment, so that every row carries its true probability
per task and the Bayes-optimal ("oracle") NE of each task can be printed next to what a model
reaches.

Scenarios (`synth.scenario`):
  - "ads" (default, the demo's): CTR, CVR given a click, conversion per impression; tasks that
    partly conflict (data/scenarios/ads.py);
  - "feeds": six engagement actions on every impression (long view, click, like, comment,
    share, follow; base rates 30 % .. 0.1 %) driven by shared user-interest and item factors,
    each label an independent Bernoulli given the row (data/scenarios/feeds.py);
  - "feeds_funnel": the same six actions with the structure of real feed logs: the deep
    actions happen only on long-viewed or clicked impressions, and a per-impression engagement
    factor (in no column) moves every action together (data/scenarios/feeds_funnel.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq

from data.scenarios import ads, feeds, feeds_funnel

log = logging.getLogger(__name__)
SCENARIOS = {"ads": ads, "feeds": feeds, "feeds_funnel": feeds_funnel}


@dataclass
class SynthConfig:
    out_dir: str = "datasets/demo"
    train_files: int = 4
    eval_files: int = 1
    rows_per_file: int = 100_000
    row_group_size: int = 16_384
    cardinality: int = 20_000  # user_id table size; other tables scale from it
    zipf_a: float = 1.1
    null_dense_rate: float = 0.05
    seed: int = 0
    scenario: str = "ads"

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"synth.scenario must be one of {sorted(SCENARIOS)}, not {self.scenario!r}")


def table_sizes(cfg: SynthConfig) -> Dict[str, int]:
    return {f[0]: max(8, int(cfg.cardinality * f[1])) for f in SCENARIOS[cfg.scenario].FEATURES}


def task_names(cfg: SynthConfig) -> List[str]:
    return list(SCENARIOS[cfg.scenario].TASK_NAMES)


def write_dataset(cfg: SynthConfig) -> Dict[str, List[Path]]:
    """Writes `train/part-*.parquet` and `eval/part-*.parquet` under `cfg.out_dir`."""
    scenario = SCENARIOS[cfg.scenario]
    latents = scenario.latents(cfg, table_sizes(cfg))
    out: Dict[str, List[Path]] = {"train": [], "eval": []}
    for split, nfiles, offset in (("train", cfg.train_files, 0), ("eval", cfg.eval_files, 10_000)):
        folder = Path(cfg.out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(nfiles):
            rng = np.random.default_rng([cfg.seed, 2, offset + i])
            path = folder / f"part-{i:05d}.parquet"
            pq.write_table(scenario.generate_rows(cfg, cfg.rows_per_file, rng, latents), path,
                           row_group_size=cfg.row_group_size)
            out[split].append(path)
    log.info("wrote %d train and %d eval files to %s", cfg.train_files, cfg.eval_files, cfg.out_dir)
    return out


def data_section(cfg: SynthConfig) -> Dict[str, object]:
    """The `[data]` schema that describes this dataset (used by tests and docs)."""
    return {
        "train": [str(Path(cfg.out_dir) / "train")],
        "eval": [str(Path(cfg.out_dir) / "eval")],
        "sparse": [{"name": n, "num_embeddings": c} for n, c in table_sizes(cfg).items()],
        "dense": [f"d{j}" for j in range(SCENARIOS[cfg.scenario].NUM_DENSE)],
        "tasks": [{"name": t} for t in task_names(cfg)],
    }
