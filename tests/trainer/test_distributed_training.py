"""2-rank gloo training through DMP + TrainPipelineSparseDist on the tiny synthetic data."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from launch.report import normalized_entropy
from tests.dist_utils import run_ranks


def _train(raw: dict):
    from trainer.loop import train
    return train(from_dict(RunConfig, raw))


def train_2_ranks(raw: dict, *overrides: str):
    return run_ranks(_train, (apply_overrides(copy.deepcopy(raw), overrides),))


def auc(p, y):
    """Mann-Whitney AUC (ties get half credit)."""
    order = np.argsort(p, kind="mergesort")
    p, y = p[order], y[order]
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]
    pos = y == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


@pytest.fixture(scope="module")
def trained(tiny_synth, tmp_path_factory):
    from tests.conftest import tiny_config
    raw = tiny_config.__wrapped__(tiny_synth, tmp_path_factory.mktemp("train"))
    summaries = train_2_ranks(raw, "trainer.epochs=2", "trainer.save_predictions=true")
    return raw, summaries


def test_loss_decreases_and_weights_agree(trained):
    raw, (s0, s1) = trained
    out = Path(raw["trainer"]["out_dir"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    total = [sum(r[f"loss/{t}"] for t in ("ctr", "cvr", "conv")) for r in train]
    assert len(total) >= 8
    assert np.mean(total[-3:]) < 0.9 * np.mean(total[:2])
    # MultiBalance weights: identical on both ranks, on the simplex, and they did move
    assert s0["final_weights"] == s1["final_weights"]
    w = np.array(s0["final_weights"])
    assert abs(w.sum() - 1) < 1e-5 and np.abs(w - 1 / 3).max() > 1e-3
    # the logged size of the weight updates is that of the weights' motion (not a window emptied
    # by the non-finite check that reads the statistics first at the same step)
    assert max(r["lambda_step/ctr"] for r in train) > 0
    assert s0["eval"] == s1["eval"]
    # every training row was read exactly once per epoch (2 epochs, 12000 rows)
    assert s0["train_reader"]["rows"] == 2 * 12_000
    assert s0["eval_reader"]["rows"] == 6_000


def test_eval_metrics_equal_a_numpy_computation(trained):
    raw, (s0, _) = trained
    out = Path(raw["trainer"]["out_dir"])
    preds = np.concatenate([np.load(out / f"eval_predictions.rank{r}.npy") for r in range(2)])
    m = 3
    assert int(preds[:, 2 * m].sum()) == 6_000  # every eval row once (the ctr mask is all ones)
    for j, task in enumerate(("ctr", "cvr", "conv")):
        keep = preds[:, 2 * m + j] > 0
        p, y = preds[keep, j], preds[keep, m + j]
        assert s0["eval"][task]["ne"] == pytest.approx(normalized_entropy(p, y), rel=1e-4)
        assert s0["eval"][task]["auc"] == pytest.approx(auc(p.astype(np.float64), y), abs=2e-3)
        assert s0["eval"][task]["ne"] < 1.0  # better than predicting the base rate


def test_resume_gives_the_same_state_as_straight_through(tiny_synth, tmp_path):
    from tests.conftest import tiny_config
    raw = tiny_config.__wrapped__(tiny_synth, tmp_path)
    common = ("trainer.save_predictions=true", "trainer.log_every=0")
    straight = train_2_ranks(raw, "trainer.max_steps=30", f"trainer.out_dir={tmp_path}/a", *common)
    half = train_2_ranks(raw, "trainer.max_steps=17", f"trainer.out_dir={tmp_path}/b", *common)
    assert half[0]["final_weights"] != pytest.approx(straight[0]["final_weights"], abs=1e-6)
    resumed = train_2_ranks(raw, "trainer.max_steps=30", f"trainer.out_dir={tmp_path}/b", *common)
    assert resumed[0]["steps"] == 30
    assert resumed[0]["final_weights"] == straight[0]["final_weights"]  # bitwise
    for r in range(2):
        a = np.load(tmp_path / "a" / f"eval_predictions.rank{r}.npy")
        b = np.load(tmp_path / "b" / f"eval_predictions.rank{r}.npy")
        np.testing.assert_array_equal(a, b)
