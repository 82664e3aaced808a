"""The funnel feeds scenario (`synth.scenario = "feeds_funnel"`): the feeds scenario's users,
items, features and per-task logits (data/scenarios/feeds.py), with the conditional structure
that real feed actions have and the independent scenario lacks.

In the independent scenario every label is its own Bernoulli given the row, so once a model
fits, the tasks' representation gradients are orthogonal. Feed logs are not like that:
  - **a funnel**: comments, shares, follows and likes happen almost only on impressions that
    were engaged with (long-viewed or clicked). Here the deep actions (like, comment, share,
    follow) are drawn only on impressions with long_view = 1 or click = 1;
  - **a per-impression engagement factor** shared by every action (the user's mood, the slot,
    how much attention this impression got), not in any feature: z ~ N(0, 1) per row, added as
    Z_SCALE * z to every task's logit.
Given the features, the labels are then positively correlated (through z and through the
funnel), and a rare action's gradient points, in part, where the engagement tasks' do.

The marginal base rates are those of feeds.TASKS (30 % .. 0.1 %): the biases are solved (by
bisection on a fixed calibration sample drawn from the seed) so that the mean marginal
probability of each task equals its rate. The stored truth `p_<task>` is the marginal
probability given the row's features and ids, z integrated out (Gauss-Hermite quadrature):
the best any model of the features can predict, so the oracle NE stays meaningful.
All parameters are fixed here; none is chosen per experiment.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import pyarrow as pa

from data.scenarios import feeds
from data.scenarios.common import sigmoid

FEATURES, NUM_DENSE, TASKS, TASK_NAMES = feeds.FEATURES, feeds.NUM_DENSE, feeds.TASKS, feeds.TASK_NAMES
T = feeds.T
Z_SCALE = 1.0  # the engagement factor's weight in every logit
FIRST = [TASK_NAMES.index("long_view"), TASK_NAMES.index("click")]  # the funnel's entry: engaged = either
DEEP = [j for j in range(T) if j not in FIRST]  # drawn only on engaged impressions
NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(16)  # E over z ~ N(0, 1) of f(z) = sum_k w_k f(z_k)
WEIGHTS = WEIGHTS / WEIGHTS.sum()
CALIBRATION_ROWS = 50_000


def marginals(logits: np.ndarray) -> np.ndarray:
    """logits [n, T] (biases included, z left out) -> the marginal probability of each label
    given the row [n, T]: P(first_t) = E_z s_t, P(deep_t) = E_z [P(engaged | z) s_t], with
    s_t = sigmoid(logit_t + Z_SCALE z) and engaged = long_view or click (independent given z)."""
    out = np.zeros_like(logits)
    for z, w in zip(NODES, WEIGHTS):
        s = sigmoid(logits + Z_SCALE * z)  # [n, T]
        engaged = 1.0 - (1.0 - s[:, FIRST[0]]) * (1.0 - s[:, FIRST[1]])  # [n]
        s[:, DEEP] *= engaged[:, None]
        out += w * s
    return out


def latents(cfg, sizes: Dict[str, int]) -> Dict[str, object]:
    """The independent scenario's latents (ids, vectors, affinity scale), with biases solved
    for the funnel: first the entry tasks', then each deep task's given those."""
    lat = feeds.latents(cfg, sizes)
    _, logits, _ = feeds._draw(cfg, CALIBRATION_ROWS, np.random.default_rng([cfg.seed, 4]), lat)
    base = logits - lat["bias"]  # [n, T] without biases
    z = Z_SCALE * NODES[:, None]  # [K, 1]
    bias = np.zeros(T)
    for j in FIRST:  # mean_rows E_z sigmoid(b + base_j + z) = rate_j
        bias[j] = _solve(lambda b: WEIGHTS @ sigmoid(b + base[:, j] + z).mean(axis=1), feeds.RATES[j])
    s0, s1 = (sigmoid(bias[j] + base[:, j] + z) for j in FIRST)  # [K, n] each
    engaged = 1.0 - (1.0 - s0) * (1.0 - s1)  # P(engaged | row, z_k)
    for j in DEEP:  # mean_rows E_z [P(engaged | z) sigmoid(b + base_j + z)] = rate_j
        bias[j] = _solve(lambda b: WEIGHTS @ (engaged * sigmoid(b + base[:, j] + z)).mean(axis=1), feeds.RATES[j])
    lat["bias"] = bias
    return lat


def _solve(mean_rate, rate: float) -> float:
    """b with mean_rate(b) = rate (monotone increasing in b: bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_rate(mid) < rate else (lo, mid)
    return 0.5 * (lo + hi)


def generate_rows(cfg, n: int, rng: np.random.Generator, lat) -> pa.Table:
    cols, logits, _ = feeds._draw(cfg, n, rng, lat)
    z = rng.normal(size=(n, 1))  # the engagement factor of each impression, in no column
    fires = rng.random((n, T)) < sigmoid(logits + Z_SCALE * z)  # [n, T]
    engaged = fires[:, FIRST].any(axis=1)
    fires[:, DEEP] &= engaged[:, None]
    prob = marginals(logits)
    for j, task in enumerate(TASK_NAMES):
        cols[task] = pa.array(fires[:, j].astype(np.int8))
    for j, task in enumerate(TASK_NAMES):
        cols[f"p_{task}"] = pa.array(prob[:, j].astype(np.float32))
    return pa.table(cols)
