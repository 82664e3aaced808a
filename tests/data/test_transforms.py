"""Dense transforms: kinds chosen from the footers, numbers fitted on a sample, the same
numbers in every split; seeded shuffling that keeps every row once and the position exact."""
import itertools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.reader import DataSource
from data.schema import DataConfig, SparseFeature, Task
from data.transforms import DenseTransform, signed_log1p


@pytest.fixture
def raw(tmp_path):
    """Columns as logs hold them: a heavy-tailed count, a year, an already scaled value."""
    rng = np.random.default_rng(0)
    n = 4000
    views = np.minimum(rng.lognormal(3, 2, n), 99_999).round()
    year = rng.integers(1990, 2021, n).astype(np.float64)
    small = rng.normal(0, 1, n)
    nulls = rng.random(n) < 0.1
    pq.write_table(pa.table({"views": pa.array(views, mask=nulls), "year": year, "small": pa.array(small, mask=nulls),
                             "rid": np.arange(n, dtype=np.float64), "u": np.arange(n) % 7,
                             "y": (rng.random(n) < 0.3).astype(np.int8)}), tmp_path / "a.parquet", row_group_size=500)
    return tmp_path, views, year, small, nulls


def _cfg(path, **kw):
    return DataConfig(**{"train": [str(path)], "sparse": [SparseFeature("u", 7)], "dense": ["views", "year", "small"],
                         "tasks": [Task("y")], "batch_size": 4000, "num_workers": 0, **kw})


def test_auto_standardizes_raw_columns_and_fills_with_the_mean(raw):
    path, views, year, small, nulls = raw
    src = DataSource([str(path)], _cfg(path), 0, 1)
    t = src.transforms
    assert t.kinds == ["log1p_standardize", "log1p_standardize", "none"]
    (batch,) = list(src.epoch())
    x = batch.dense_features.numpy()
    for j in (0, 1):  # about N(0, 1) (the sample is every row group here)
        assert abs(x[~nulls, j].mean()) < 0.05 and abs(x[~nulls, j].std() - 1) < 0.05
    # float32 arithmetic: log(2007) has ~5e-7 relative error, 1e-3 after dividing by std 0.0045 (a year is 0.11)
    assert np.allclose(x[:, 1], (signed_log1p(year) - t.mean[1]) / t.std[1], atol=2e-3)
    assert (x[nulls, 0] == 0).all()  # null: the mean after the transform
    assert np.allclose(x[nulls, 2], small[~nulls].mean(), atol=1e-5)  # as-is column: its mean
    assert np.allclose(x[~nulls, 2], small[~nulls], atol=1e-6)


def test_clip_explicit_kinds_and_fill(raw, caplog):
    path, views, *_ = raw
    cfg = _cfg(path, dense_transform="none", transform={
        "views": DenseTransform(kind="log1p", clip=[0, 100], fill=-1.0), "small": DenseTransform(kind="standardize")})
    with caplog.at_level(logging.WARNING):
        src = DataSource([str(path)], cfg, 0, 1)
    assert "'year' ranges over [1990, 2020] and is fed as is" in caplog.text
    (batch,) = list(src.epoch())
    x = batch.dense_features.numpy()
    ok = ~raw[4]
    assert np.allclose(x[ok, 0], np.log1p(np.minimum(views[ok], 100)), atol=1e-5)
    assert (x[raw[4], 0] == -1).all()
    assert src.transforms.kinds == ["log1p", "none", "standardize"]


def test_eval_uses_the_training_numbers(raw, tmp_path_factory):
    path = raw[0]
    other = tmp_path_factory.mktemp("ev")
    pq.write_table(pa.table({"views": [10.0, 1e4], "year": [2000.0, 2001.0], "small": [0.0, 1.0], "rid": [0.0, 1.0],
                             "u": [1, 2], "y": pa.array([0, 1], pa.int8())}), other / "e.parquet")
    cfg = _cfg(path)
    train = DataSource([str(path)], cfg, 0, 1)
    ev = DataSource([str(other)], cfg, 0, 1, transforms=train.transforms)
    (batch,) = list(ev.epoch())
    want = (signed_log1p(np.array([10.0, 1e4])) - train.transforms.mean[0]) / train.transforms.std[0]
    assert np.allclose(batch.dense_features[:, 0].numpy(), want, atol=1e-5)


def _rows(src, epoch):
    return [int(r) for b in src.epoch(epoch) for r in b.dense_features[:, 0].tolist() if b.label_mask.sum() > 0]


def test_shuffle_every_row_once_a_new_order_each_epoch_same_counts(raw):
    path = raw[0]
    base = dict(dense=["rid"], dense_transform="none", batch_size=64, num_workers=2)
    plain = [DataSource([str(path)], _cfg(path, **base), r, 2) for r in range(2)]
    shuf = [DataSource([str(path)], _cfg(path, **base, shuffle=True, shuffle_buffer=700), r, 2, shuffle=True)
            for r in range(2)]
    for e in (0, 1):
        rows = [_rows(s, e) for s in shuf]
        assert sorted(rows[0] + rows[1]) == list(range(4000))
        assert sorted(rows[0]) == sorted(_rows(plain[0], 0))  # each reader keeps its row groups
    assert _rows(shuf[0], 0) != _rows(shuf[0], 1) != _rows(plain[0], 0)
    assert _rows(shuf[0], 1) == _rows(shuf[0], 1)  # seeded: the same order again
    assert [s.rank_batches for s in shuf] == [p.rank_batches for p in plain]


def test_a_resumed_stream_continues_the_shuffled_order(raw):
    from trainer.start import Position, Timeline
    path = raw[0]
    cfg = _cfg(path, dense=["rid"], dense_transform="none", batch_size=64, shuffle=True, shuffle_buffer=500)
    src = DataSource([str(path)], cfg, 0, 1, shuffle=True)
    timeline = Timeline(src, Position())
    whole = [b.dense_features[:, 0].tolist() for b in itertools.islice(timeline.stream(0), 150)]
    at_70 = Timeline(src, timeline.at(70))  # what a resume at step 70 continues from
    resumed = [b.dense_features[:, 0].tolist() for b in itertools.islice(at_70.stream(70), 80)]
    assert resumed == whole[70:]  # crosses the epoch boundary (63 steps per epoch)


def test_id_health_flags_a_table_too_small(raw, caplog):
    from data.footers import read_footers
    from data.reader import id_health
    path = raw[0]
    pq.write_table(pa.table({"u": pa.array([f"user{i}" for i in range(3000)]), "v": np.arange(3000) % 50,
                             "y": pa.array([0, 1] * 1500, pa.int8())}), path / "ids.parquet")
    cfg = DataConfig(train=[str(path / "ids.parquet")], sparse=[SparseFeature("u", 300), SparseFeature("v", 50)],
                     tasks=[Task("y")])
    with caplog.at_level(logging.WARNING):
        health = id_health(read_footers(cfg.train, cfg), cfg)
    assert health["u"]["sampled_distinct_ids"] == 3000 and health["u"]["collision_share"] > 0.85
    assert health["v"]["collision_share"] == 0.0  # ids within the table map to themselves
    assert health["v"]["remapped_share"] == 0.0 and health["u"]["ids"] == "string (hashed)"
    assert "sparse feature 'u': " in caplog.text and "of its 3000 distinct sampled ids share" in caplog.text
    assert "'v'" not in caplog.text
    cfg.sparse[1].num_embeddings = 40  # ids 40..49 now fall outside: 10 of 50 values, 20 % of rows
    health = id_health(read_footers(cfg.train, cfg), cfg)
    assert health["v"]["remapped_share"] == 0.2
    assert health["v"]["collision_share"] >= 0.2  # each remapped id lands on a row an in-range id holds


def test_id_health_measures_what_an_estimate_missed(tmp_path, caplog):
    """386 string values in 2 x 386 rows: about 39 % of them share a row (the birthday bound), far
    more than the 20 % an occupancy estimate gave; the measured share is what is reported."""
    from data.footers import read_footers
    from data.hashing import hash_strings
    from data.reader import id_health
    values = [f"category {i}" for i in range(386)]
    pq.write_table(pa.table({"c": pa.array(values * 4), "y": pa.array([0, 1] * 772, pa.int8())}), tmp_path / "c.parquet")
    cfg = DataConfig(train=[str(tmp_path / "c.parquet")], sparse=[SparseFeature("c", 772)], tasks=[Task("y")])
    rows = hash_strings(pa.array(values), 772)
    _, counts = np.unique(rows, return_counts=True)
    with caplog.at_level(logging.WARNING):
        health = id_health(read_footers(cfg.train, cfg), cfg)
    assert health["c"]["collision_share"] == round(counts[counts > 1].sum() / 386, 4) > 0.3
    assert "sparse feature 'c'" in caplog.text
