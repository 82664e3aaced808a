"""The built-in synthetic click-log dataset (`mbrec synth`).

A known generative model, fixed here and not tuned per experiment, so that every row carries
its true probability per task and the Bayes-optimal ("oracle") NE of each task can be printed
next to what a model reaches.

Structure (like the paper's ads model, Section 5):
  - every id of every categorical feature owns a latent vector in R^4 with components
    (s, c, v, x): s = shared by all tasks, c = click only, v = conversion only,
    x = conflicting (raises clicks, lowers conversion given a click);
  - a row's latent factors z are the sum over its features of the ids' vectors
    (multi-hot features: the mean over the list);
  - CTR:       logit_c = b_c + 1.0 z_s + 0.8 z_c + 0.8 z_x + 0.4 d0 + 0.3 d1 z_s
    CVR:       logit_v = b_v + 0.6 z_s + 1.0 z_v - 0.8 z_x + 0.4 d2 - 0.3 d3 z_v
    click ~ Bernoulli(sigmoid(logit_c)); conversion ~ Bernoulli(sigmoid(logit_v)) on clicks;
    labels: ctr = click, cvr = conversion (null where there is no click),
            conv = click and conversion (the conversion-per-impression task);
  - ids follow a power law (Zipf exponent `zipf_a`), dense features are N(0, 1) with 5 %
    nulls in d0..d3 (the truth uses the value before it was nulled).
Every row is labelled for CTR and Conv|imp, only clicked rows for CVR: CTR has the most
labelled rows and the largest gradients, and shares the conflicting factor x with CVR.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# (name, cardinality multiplier of `SynthConfig.cardinality`, multi-hot mean length or 0,
#  latent scale per component (s, c, v, x))
FEATURES: List[Tuple[str, float, int, Tuple[float, float, float, float]]] = [
    ("user_id", 1.0, 0, (0.5, 0.4, 0.3, 0.5)),
    ("item_id", 0.5, 0, (0.5, 0.3, 0.5, 0.5)),
    ("advertiser_id", 0.05, 0, (0.4, 0.2, 0.5, 0.3)),
    ("category", 0.005, 0, (0.3, 0.3, 0.3, 0.3)),
    ("user_history", 0.5, 6, (0.6, 0.3, 0.3, 0.6)),
    ("context", 0.01, 2, (0.3, 0.4, 0.2, 0.3)),
]
NUM_DENSE = 8
TASKS = ("ctr", "cvr", "conv")
BIAS_CTR, BIAS_CVR = -1.4, -0.6


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


def table_sizes(cfg: SynthConfig) -> Dict[str, int]:
    return {name: max(8, int(cfg.cardinality * mult)) for name, mult, _, _ in FEATURES}


def _zipf_ids(rng: np.random.Generator, n: int, card: int, a: float, perm: np.ndarray) -> np.ndarray:
    """Power-law ids in [0, card): rank k drawn with probability ~ k^-a, then a fixed
    permutation so that frequent ids are spread over the table."""
    p = np.arange(1, card + 1, dtype=np.float64) ** -a
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), card - 1)
    return perm[ranks]


def _latents(cfg: SynthConfig) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per feature: (latent table [card, 4], id permutation [card]); depends on seed only."""
    rng = np.random.default_rng([cfg.seed, 1])
    out = {}
    for name, _, _, scale in FEATURES:
        card = table_sizes(cfg)[name]
        out[name] = (rng.normal(size=(card, 4)) * np.asarray(scale), rng.permutation(card))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_rows(cfg: SynthConfig, n: int, rng: np.random.Generator, latents) -> pa.Table:
    cols: Dict[str, pa.Array] = {}
    z = np.zeros((n, 4))
    for name, _, mean_len, _ in FEATURES:
        table, perm = latents[name]
        card = table.shape[0]
        if mean_len == 0:
            ids = _zipf_ids(rng, n, card, cfg.zipf_a, perm)
            z += table[ids]
            cols[name] = pa.array(ids, pa.int64())
        else:
            lengths = rng.poisson(mean_len, n)
            ids = _zipf_ids(rng, int(lengths.sum()), card, cfg.zipf_a, perm)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            cs = np.vstack([np.zeros((1, 4)), np.cumsum(table[ids], axis=0)])  # segment sums
            sums = cs[offsets[1:]] - cs[offsets[:-1]]  # [n, 4]; 0 for empty lists
            z += sums / np.maximum(lengths, 1)[:, None]
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
    d = rng.normal(size=(n, NUM_DENSE))
    zs, zc, zv, zx = z.T
    p_ctr = _sigmoid(BIAS_CTR + 1.0 * zs + 0.8 * zc + 0.8 * zx + 0.4 * d[:, 0] + 0.3 * d[:, 1] * zs)
    p_cvr = _sigmoid(BIAS_CVR + 0.6 * zs + 1.0 * zv - 0.8 * zx + 0.4 * d[:, 2] - 0.3 * d[:, 3] * zv)
    click = rng.random(n) < p_ctr
    conv = click & (rng.random(n) < p_cvr)
    for j in range(NUM_DENSE):
        nulls = (rng.random(n) < cfg.null_dense_rate) if j < 4 else np.zeros(n, bool)
        cols[f"d{j}"] = pa.array(d[:, j].astype(np.float32), pa.float32(), mask=nulls)
    cols["ctr"] = pa.array(click.astype(np.int8))
    cols["cvr"] = pa.array(conv.astype(np.int8), mask=~click)
    cols["conv"] = pa.array(conv.astype(np.int8))
    cols["p_ctr"] = pa.array(p_ctr.astype(np.float32))
    cols["p_cvr"] = pa.array(p_cvr.astype(np.float32))
    cols["p_conv"] = pa.array((p_ctr * p_cvr).astype(np.float32))
    return pa.table(cols)


def write_dataset(cfg: SynthConfig) -> Dict[str, List[Path]]:
    """Writes `train/part-*.parquet` and `eval/part-*.parquet` under `cfg.out_dir`."""
    latents = _latents(cfg)
    out: Dict[str, List[Path]] = {"train": [], "eval": []}
    for split, nfiles, offset in (("train", cfg.train_files, 0), ("eval", cfg.eval_files, 10_000)):
        folder = Path(cfg.out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(nfiles):
            rng = np.random.default_rng([cfg.seed, 2, offset + i])
            path = folder / f"part-{i:05d}.parquet"
            pq.write_table(generate_rows(cfg, cfg.rows_per_file, rng, latents), path,
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
        "dense": [f"d{j}" for j in range(NUM_DENSE)],
        "tasks": [{"name": t} for t in TASKS],
    }
