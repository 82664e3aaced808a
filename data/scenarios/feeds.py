"""The feeds scenario (`synth.scenario = "feeds"`): six engagement tasks on every impression of a
content feed, driven mostly by what they share (like the paper's feeds model, Section 5: many
tasks, shared knowledge).

What such logs look like, and how each part is modelled:
  - engagement is mostly "does this user care about this item": a user-interest vector p and an
    item-topic vector q in R^8, affinity a = p . q (standardised); p sums the user's own vector
    and 0.7 x the mean of the vectors of the items in their history (history ids are item ids,
    with the item table's vectors); q sums the item's, its author's and its topic's vectors;
  - some items are better than others for every action: a quality score (item + author);
  - each action also has its own reasons (a funny item is shared, an author is followed, a
    user comments): every id owns a task-specific offset per task, e_t;
  - dense features: d0 item length (long views up, clicks down), d1 user activity (every
    action up), d2 freshness (clicks, comments, shares up), d3 user talkativeness (comments);
    d4..d7 carry nothing; 5 % nulls in d0..d3;
  - logit_t = b_t + alpha_t a + kappa_t quality + e_t + dense terms; each label is an
    independent Bernoulli(sigmoid(logit_t)) given the row (the stored p_t is the truth);
  - base rates span 0.1 % (follow) to 30 % (long view), as feed actions do: b_t is solved
    (bisection, on a fixed calibration sample drawn from the seed) so that the mean
    probability equals the rate in TASKS.
All parameters are fixed here; none is chosen per experiment.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from data.scenarios.common import dense_columns, multi_hot, sigmoid, zipf_ids

K = 8  # interest dimensions
# (task, base rate, alpha: affinity weight, kappa: quality weight,
#  dense weights on d0 (length), d1 (activity), d2 (freshness), d3 (talkativeness))
TASKS: List[Tuple[str, float, float, float, Tuple[float, float, float, float]]] = [
    ("long_view", 0.30, 0.8, 0.6, (0.5, 0.3, 0.0, 0.0)),
    ("click", 0.12, 1.0, 0.3, (-0.2, 0.3, 0.2, 0.0)),
    ("like", 0.03, 1.0, 0.6, (0.0, 0.3, 0.0, 0.0)),
    ("comment", 0.006, 0.8, 0.4, (0.0, 0.3, 0.2, 0.4)),
    ("share", 0.003, 0.7, 0.8, (0.0, 0.3, 0.3, 0.0)),
    ("follow", 0.001, 0.9, 0.3, (0.0, 0.3, 0.0, 0.0)),
]
T = len(TASKS)
TASK_NAMES = [t[0] for t in TASKS]
RATES, ALPHA, KAPPA = (np.array([t[i] for t in TASKS]) for i in (1, 2, 3))  # [T] each
DENSE_W = np.array([t[4] for t in TASKS])  # [T, 4]
# (name, cardinality multiplier, multi-hot mean length or 0, side, interest scale,
#  task-specific offset scale, quality scale); side: user | item | history | context
FEATURES: List[Tuple[str, float, int, str, float, float, float]] = [
    ("user_id", 1.0, 0, "user", 0.6, 0.4, 0.0),
    ("item_id", 0.5, 0, "item", 0.5, 0.4, 0.5),
    ("author_id", 0.05, 0, "item", 0.4, 0.4, 0.4),
    ("topic", 0.005, 0, "item", 0.4, 0.3, 0.0),
    ("user_history", 0.5, 8, "history", 0.0, 0.0, 0.0),
    ("context", 0.01, 2, "context", 0.0, 0.2, 0.0),
]
NUM_DENSE = 8
CALIBRATION_ROWS = 200_000


def latents(cfg, sizes: Dict[str, int]) -> Dict[str, object]:
    """Per feature: (interest [card, K], offsets [card, T], quality [card], id permutation);
    then the affinity scale and the biases b_t, solved on a calibration sample."""
    rng = np.random.default_rng([cfg.seed, 1])
    lat: Dict[str, object] = {}
    for name, _, _, side, s_int, s_off, s_q in FEATURES:
        card = sizes[name]
        lat[name] = (rng.normal(size=(card, K)) * s_int, rng.normal(size=(card, T)) * s_off,
                     rng.normal(size=card) * s_q, rng.permutation(card))
    lat["affinity_scale"], lat["bias"] = 1.0, np.zeros(T)
    _, logits, a = _draw(cfg, CALIBRATION_ROWS, np.random.default_rng([cfg.seed, 3]), lat)
    lat["affinity_scale"] = 1.0 / float(a.std())
    logits = logits + (lat["affinity_scale"] - 1.0) * a[:, None] * ALPHA  # (logits are linear in the scale)
    lat["bias"] = np.array([_solve_bias(logits[:, j], rate) for j, rate in enumerate(RATES)])
    return lat


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    """b with mean(sigmoid(b + logit)) = rate (monotone in b: bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigmoid(mid + logit).mean() < rate else (lo, mid)
    return 0.5 * (lo + hi)


def _draw(cfg, n: int, rng: np.random.Generator, lat) -> Tuple[Dict[str, pa.Array], np.ndarray, np.ndarray]:
    """Id and dense columns, logits [n, T] and affinity [n] (before scaling)."""
    cols: Dict[str, pa.Array] = {}
    p, q = np.zeros((n, K)), np.zeros((n, K))
    offsets, quality = np.zeros((n, T)), np.zeros(n)
    for name, _, mean_len, side, *_ in FEATURES:
        if side == "history":  # the items a user engaged with before: item ids, item vectors
            interest, _, _, perm = lat["item_id"]
            cols[name], mean = multi_hot(rng, n, mean_len, interest, cfg.zipf_a, perm)
            p += 0.7 * mean
            continue
        interest, off, qual, perm = lat[name]
        if mean_len:
            cols[name], mean = multi_hot(rng, n, mean_len, off, cfg.zipf_a, perm)
            offsets += mean
            continue
        ids = zipf_ids(rng, n, len(perm), cfg.zipf_a, perm)
        cols[name] = pa.array(ids, pa.int64())
        (p if side == "user" else q)[:] += interest[ids]
        offsets += off[ids]
        quality += qual[ids]
    d = rng.normal(size=(n, NUM_DENSE))
    cols.update(dense_columns(rng, d, 4, cfg.null_dense_rate))
    a = (p * q).sum(axis=1)
    logits = (lat["bias"] + lat["affinity_scale"] * a[:, None] * ALPHA + quality[:, None] * KAPPA
              + offsets + d[:, :4] @ DENSE_W.T)
    return cols, logits, a


def generate_rows(cfg, n: int, rng: np.random.Generator, lat) -> pa.Table:
    cols, logits, _ = _draw(cfg, n, rng, lat)
    prob = sigmoid(logits)  # [n, T]
    labels = rng.random((n, T)) < prob
    for j, task in enumerate(TASK_NAMES):
        cols[task] = pa.array(labels[:, j].astype(np.int8))
    for j, task in enumerate(TASK_NAMES):
        cols[f"p_{task}"] = pa.array(prob[:, j].astype(np.float32))
    return pa.table(cols)
