"""The ads scenario (`synth.scenario = "ads"`, the demo's): CTR, CVR given a click, conversion
per impression, with one factor that raises clicks and lowers conversions (like the paper's ads
model, Section 5: tasks that partly conflict).

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
    nulls in d0..d3.
Every row is labelled for CTR and Conv|imp, only clicked rows for CVR: CTR has the most
labelled rows and the largest gradients, and shares the conflicting factor x with CVR.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from data.scenarios.common import dense_columns, multi_hot, sigmoid, zipf_ids

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
TASK_NAMES = list(TASKS)
BIAS_CTR, BIAS_CVR = -1.4, -0.6


def latents(cfg, sizes: Dict[str, int]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per feature: (latent table [card, 4], id permutation [card]); depends on seed only."""
    rng = np.random.default_rng([cfg.seed, 1])
    return {name: (rng.normal(size=(sizes[name], 4)) * np.asarray(scale), rng.permutation(sizes[name]))
            for name, _, _, scale in FEATURES}


def generate_rows(cfg, n: int, rng: np.random.Generator, lat) -> pa.Table:
    cols: Dict[str, pa.Array] = {}
    z = np.zeros((n, 4))
    for name, _, mean_len, _ in FEATURES:
        table, perm = lat[name]
        if mean_len == 0:
            ids = zipf_ids(rng, n, table.shape[0], cfg.zipf_a, perm)
            z += table[ids]
            cols[name] = pa.array(ids, pa.int64())
        else:
            cols[name], mean = multi_hot(rng, n, mean_len, table, cfg.zipf_a, perm)
            z += mean
    d = rng.normal(size=(n, NUM_DENSE))
    zs, zc, zv, zx = z.T
    p_ctr = sigmoid(BIAS_CTR + 1.0 * zs + 0.8 * zc + 0.8 * zx + 0.4 * d[:, 0] + 0.3 * d[:, 1] * zs)
    p_cvr = sigmoid(BIAS_CVR + 0.6 * zs + 1.0 * zv - 0.8 * zx + 0.4 * d[:, 2] - 0.3 * d[:, 3] * zv)
    click = rng.random(n) < p_ctr
    conv = click & (rng.random(n) < p_cvr)
    cols.update(dense_columns(rng, d, 4, cfg.null_dense_rate))
    cols["ctr"] = pa.array(click.astype(np.int8))
    cols["cvr"] = pa.array(conv.astype(np.int8), mask=~click)
    cols["conv"] = pa.array(conv.astype(np.int8))
    cols["p_ctr"] = pa.array(p_ctr.astype(np.float32))
    cols["p_cvr"] = pa.array(p_cvr.astype(np.float32))
    cols["p_conv"] = pa.array((p_ctr * p_cvr).astype(np.float32))
    return pa.table(cols)
