"""Logs as production writes them, trained as they are: string ids, a table shared by two
features (mean pooling, its own dim), a weighted binary task and a regression task in one model;
every balancer runs unchanged with them; 2 gloo ranks agree and their metrics equal numpy's."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import REGISTRY, BalancerConfig, build_balancer
from data.batch import Batch
from data.schema import DataConfig
from launch.config import ConfigError, RunConfig, from_dict
from models.mtl import ModelConfig, MultiTaskDCN, build_ebc
from tests.dist_utils import run_ranks
from trainer.task_model import MultiTaskTrain, masked_task_losses


def write_logs(folder, n, seed):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 300, n)
    item = rng.integers(0, 200, n)
    taste = np.sin(user) + np.cos(item)  # a shared latent: both tasks learn from it
    click = (rng.random(n) < 1 / (1 + np.exp(-(taste - 1)))).astype(np.int8)
    watch = np.where(click == 1, np.exp(taste + rng.normal(0, 0.3, n)), 0.0)
    folder.mkdir(parents=True)
    for part in range(2):
        s = slice(part * n // 2, (part + 1) * n // 2)
        pq.write_table(pa.table({
            "user": pa.array([f"u{u}" for u in user[s]]), "item_id": pa.array([f"item{i}" for i in item[s]]),
            "hist_item_ids": pa.array([[f"item{j}" for j in rng.integers(0, 200, k)] for k in rng.integers(0, 5, len(user[s]))]),
            "views": rng.lognormal(5, 2, len(user[s])).round(), "click": click[s],
            "click_weight": rng.choice([1.0, 2.0], len(user[s])), "watch_s": pa.array(watch[s], mask=click[s] == 0),
        }), folder / f"part-{part}.parquet", row_group_size=500)


DATA = {
    "dense": ["views"], "batch_size": 128, "num_workers": 1,
    "tables": [{"name": "item", "num_embeddings": 256, "dim": 12, "pooling": "mean"}],
    "sparse": [{"name": "user", "num_embeddings": 512}, {"name": "item_id", "table": "item"},
               {"name": "hist_item_ids", "table": "item"}],
    "tasks": [{"name": "click", "weight": "click_weight"}, {"name": "watch_s", "kind": "regression"}],
}


def test_shared_tables_resolve_and_bad_ones_are_named():
    cfg = from_dict(DataConfig, DATA)
    assert [f.num_embeddings for f in cfg.sparse] == [512, 256, 256]
    specs = cfg.table_specs()
    assert [(t.name, t.dim, t.pooling, t.features) for t in specs] == [
        ("item", 12, "mean", ["item_id", "hist_item_ids"]), ("user", 0, "sum", ["user"])]
    for change, msg in [({"sparse": [{"name": "a", "table": "nope"}]}, "table 'nope' is not in data.tables"),
                        ({"sparse": [{"name": "a", "table": "item", "num_embeddings": 5}]}, "differs from its table"),
                        ({"sparse": [{"name": "item", "num_embeddings": 5}, {"name": "b", "table": "item"}]},
                         "also a feature"),
                        ({"tasks": [{"name": "t", "kind": "ranking"}]}, "kind must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, {**DATA, **change})


def test_every_balancer_trains_a_binary_and_a_regression_task():
    cfg = from_dict(DataConfig, DATA)
    mcfg = ModelConfig(embedding_dim=4, dense_arch=[8, 4], cross_layers=1, cross_low_rank=3, shared_arch=[12, 6],
                       head_arch=[5])
    g = torch.Generator().manual_seed(0)
    n = 16
    lengths = torch.randint(0, 3, (3 * n,), generator=g, dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item_id", "hist_item_ids"],
                                              torch.randint(0, 256, (int(lengths.sum()),), generator=g), lengths)
    labels = torch.stack([(torch.rand(n, generator=g) < 0.3).float(), 50 * torch.rand(n, generator=g)], 1)
    batch = Batch(torch.randn(n, 1, generator=g), kjt, labels, torch.ones(n, 2), torch.zeros(6, dtype=torch.int64))
    for method in REGISTRY:
        torch.manual_seed(0)
        model = MultiTaskDCN(build_ebc(cfg.table_specs(), 4, torch.device("cpu")), 1, 2, mcfg)
        bcfg = from_dict(BalancerConfig, {"method": method, **({"fixed": {"weights": [1.0, 0.5]}} if method == "fixed" else {})})
        module = MultiTaskTrain(model, build_balancer(bcfg, 2), regression=[False, True])
        for _ in range(3):
            loss, (losses, preds, *_) = module(batch)
            loss.backward()
        assert torch.isfinite(losses).all() and torch.isfinite(module.balancer.weights).all(), method
        assert ((preds[:, 0] > 0) & (preds[:, 0] < 1)).all()  # a probability; watch time is a value
        want = ((model.task_logits(model.representation(batch.dense_features, kjt).expand(2, -1, -1))[:, 1]
                 - labels[:, 1]) ** 2).mean().detach()
        assert losses[1] == pytest.approx(float(want), rel=1e-4), method


def test_weighted_losses():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, 3.0], [0.0, 0.5]])
    w = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    got = masked_task_losses(logits, labels, w, "labelled", torch.tensor([False, True]))
    assert got[0] == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-0.0)))) \
        and got[1] == pytest.approx((1.0 + 2.25) / 2)


def _train(raw):
    from trainer.loop import train
    return train(from_dict(RunConfig, raw))


def test_two_ranks_train_production_logs(tmp_path, tiny_config):
    write_logs(tmp_path / "train", 4000, 0)
    write_logs(tmp_path / "eval", 1200, 1)
    raw = {**tiny_config, "data": {**DATA, "train": [str(tmp_path / "train")], "eval": [str(tmp_path / "eval")],
                                   "shuffle": True, "shuffle_buffer": 1000}}
    raw["trainer"].update(max_steps=20, save_predictions=True, out_dir=str(tmp_path / "run"))
    a, b = run_ranks(_train, (raw,))
    assert a["eval"] == b["eval"] and a["final_weights"] == b["final_weights"]
    assert a["train_reader"]["ids_hashed"] > 0 and a["tasks"][1]["kind"] == "regression"
    preds = np.concatenate([np.load(tmp_path / "run" / f"eval_predictions.rank{r}.npy") for r in range(2)])
    p, y, w = preds[:, 0:2].astype(np.float64), preds[:, 2:4], preds[:, 4:6]
    keep = w[:, 0] > 0
    assert a["eval"]["click"]["auc"] == pytest.approx(auc_weighted(p[keep, 0], y[keep, 0], w[keep, 0]), abs=1e-4)
    lab = w[:, 1] > 0
    assert a["eval"]["watch_s"]["rows"] == int(lab.sum()) and "ne" not in a["eval"]["watch_s"]
    mse = float((w[lab, 1] * (p[lab, 1] - y[lab, 1]) ** 2).sum() / w[lab, 1].sum())
    assert a["eval"]["watch_s"]["mse"] == pytest.approx(mse, rel=1e-4)
    assert a["eval"]["watch_s"]["mae"] == pytest.approx(float(np.abs(p[lab, 1] - y[lab, 1]).mean()), rel=1e-4)


def auc_weighted(p, y, w):
    """AUC with row weights: the weighted share of (positive, negative) pairs ranked right."""
    order = np.argsort(p, kind="stable")
    p, y, w = p[order], y[order], w[order]
    neg_below = np.cumsum(w * (1 - y)) - w * (1 - y)
    return float((w * y * neg_below).sum() / ((w * y).sum() * (w * (1 - y)).sum()))


@pytest.mark.parametrize("column,values,match", [
    ("watch", [1.0, float("inf"), 2.0, 0.5], "label column 'watch' has value inf .*finite or null \\(regression\\)"),
    ("w", [1.0, -2.0, 1.0, 1.0], "weight column 'w' \\(task 'click'\\) has value -2 .*finite and >= 0"),
    ("click", [0, 1, 3, 1], "label column 'click' has value 3"),
])
def test_bad_labels_and_weights_are_named(tmp_path, column, values, match):
    from data.errors import DataError
    from data.reader import DataSource
    cols = {"u": pa.array([1, 2, 3, 4]), "click": pa.array([0, 1, 0, 1], pa.int8()),
            "w": pa.array([1.0, 2.0, None, 0.0]), "watch": pa.array([1.0, None, 3.0, 0.0])}
    cols[column] = pa.array(values)
    pq.write_table(pa.table(cols), tmp_path / "a.parquet")
    cfg = from_dict(DataConfig, {"train": [str(tmp_path)], "sparse": [{"name": "u", "num_embeddings": 8}],
                                 "tasks": [{"name": "click", "weight": "w"}, {"name": "watch", "kind": "regression"}],
                                 "batch_size": 4, "num_workers": 0})
    src = DataSource(cfg.train, cfg, 0, 1)
    with pytest.raises(DataError, match=match):
        list(src.epoch())


def test_weights_and_null_weights_reach_the_mask(tmp_path):
    from data.reader import DataSource
    pq.write_table(pa.table({"u": pa.array([1, 2, 3, 4]), "click": pa.array([0, 1, None, 1], pa.int8()),
                             "w": pa.array([1.5, None, 2.0, 0.0]), "watch": pa.array([1.0, None, 3.0, -0.5])}),
                   tmp_path / "a.parquet")
    cfg = from_dict(DataConfig, {"train": [str(tmp_path)], "sparse": [{"name": "u", "num_embeddings": 8}],
                                 "tasks": [{"name": "click", "weight": "w"}, {"name": "watch", "kind": "regression"}],
                                 "batch_size": 4, "num_workers": 0})
    (batch,) = list(DataSource(cfg.train, cfg, 0, 1).epoch())
    assert batch.label_mask.tolist() == [[1.5, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]  # null label, null weight: 0
    assert batch.labels[:, 1].tolist() == [1.0, 0.0, 3.0, -0.5]
