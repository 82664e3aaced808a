"""Inputs that used to be taken silently: a NaN sample weight (an error, as any non-finite
weight; a null weight is 0), ids of another kind in eval or scoring data than in training (an
error naming the column), column names that need quoting in a drafted config."""
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import DataError
from data.footers import read_footers
from data.reader import DataSource
from data.schema import DataConfig, SparseFeature, Task
from trainer.preflight import check_id_kinds


def _weights(path, w):
    n = len(w)
    pq.write_table(pa.table({"u": np.arange(n) % 5, "y": pa.array([0, 1] * (n // 2), pa.int8()),
                             "w": pa.array(w, pa.float64())}), path, row_group_size=n)
    cfg = DataConfig(train=[str(path)], sparse=[SparseFeature("u", 5)], tasks=[Task("y", weight="w")],
                     num_workers=0, batch_size=n)
    return list(DataSource(cfg.train, cfg, 0, 1).batches(0))


def test_a_nan_weight_is_an_error_and_a_null_weight_is_zero(tmp_path):
    with pytest.raises(DataError, match=r"weight column 'w' \(task 'y'\) has value nan \(row 2 of row group 0\)"):
        _weights(tmp_path / "nan.parquet", [1.0, 2.0, float("nan"), 1.0])
    (batch,) = _weights(tmp_path / "null.parquet", [1.0, 2.0, None, 1.0])
    assert batch.label_mask[:, 0].tolist() == [1.0, 2.0, 0.0, 1.0]


def test_ids_of_another_kind_than_trainings_are_named(tmp_path):
    pq.write_table(pa.table({"u": ["a", "b"], "y": pa.array([0, 1], pa.int8())}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"u": [1, 2], "y": pa.array([0, 1], pa.int8())}), tmp_path / "eval.parquet")
    cfg = DataConfig(sparse=[SparseFeature("u", 5)], tasks=[Task("y")])
    train, ev = read_footers([str(tmp_path / "train.parquet")], cfg), read_footers([str(tmp_path / "eval.parquet")], cfg)
    check_id_kinds(train.string_ids, train, ["u"], "data.eval")  # the same kind: fine
    with pytest.raises(DataError, match=r"sparse column 'u': training ids are strings but data.eval holds integers"):
        check_id_kinds(train.string_ids, ev, ["u"], "data.eval")


def test_a_draft_quotes_every_name(tmp_path):
    from data.draft import draft
    pq.write_table(pa.table({'the "user"': [f"u{i % 40}" for i in range(400)], "price\\eur": np.arange(400) * 1.5,
                             "click it": pa.array([0, 1] * 200, pa.int8())}), tmp_path / "q.parquet")
    data = tomllib.loads(draft([str(tmp_path / "q.parquet")]))["data"]
    assert data["sparse"][0]["name"] == 'the "user"' and data["dense"] == ["price\\eur"]
    assert data["tasks"] == [{"name": "click it"}]


def test_physical_types_that_read_alike_are_accepted(tmp_path):
    ids = ["a", "b", "c", "a"]
    pq.write_table(pa.table({"s": pa.array(ids, pa.string()), "i": pa.array([1, 2, 3, 4], pa.int32()),
                             "y": pa.array([0, 1, 0, 1], pa.int8())}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"s": pa.array(ids, pa.large_string()).dictionary_encode(),
                             "i": pa.array([1, 2, 3, 4], pa.int64()), "y": pa.array([0, 1, 0, 1], pa.float32())}),
                   tmp_path / "2.parquet")
    cfg = DataConfig(train=[str(tmp_path)], sparse=[SparseFeature("s", 16), SparseFeature("i", 8)], tasks=[Task("y")],
                     num_workers=0, batch_size=4)
    a, b = DataSource(cfg.train, cfg, 0, 1).batches(0)
    assert a.sparse_features.values().tolist() == b.sparse_features.values().tolist()  # the same rows
    pq.write_table(pa.table({"s": pa.array([1, 2, 3, 4]), "i": pa.array([1, 2, 3, 4]),
                             "y": pa.array([0, 1, 0, 1], pa.int8())}), tmp_path / "3.parquet")
    with pytest.raises(DataError, match=r"column 's' holds string \(string\) in .*1.parquet but integer \(int64\)"):
        read_footers([str(tmp_path)], cfg)


def test_globs_over_directories_take_their_parquet_files_only(tmp_path):
    from data.storage import resolve_files
    for day in ("2026-11-19", "2026-11-20", "2026-11-21"):
        d = tmp_path / f"dt={day}"
        d.mkdir()
        pq.write_table(pa.table({"x": [1]}), d / "part-0.parquet")
        (d / "_SUCCESS").write_text("")
        (d / ".part-0.parquet.crc").write_text("")
    assert resolve_files([f"{tmp_path}/dt=2026-11-2*/"]) == [f"{tmp_path}/dt=2026-11-2{i}/part-0.parquet" for i in (0, 1)]
    assert resolve_files([f"{tmp_path}/dt=2026-11-2*"]) == resolve_files([f"{tmp_path}/dt=2026-11-2*/"])
    assert len(resolve_files([f"{tmp_path}/dt=*/*"])) == 3  # a file glob: _SUCCESS and .crc left out


def test_a_missing_eval_group_column_is_named_from_the_footers(tmp_path):
    pq.write_table(pa.table({"u": [1, 2], "g": ["a", "b"], "y": pa.array([0, 1], pa.int8())}), tmp_path / "e.parquet")
    cfg = DataConfig(sparse=[SparseFeature("u", 5)], tasks=[Task("y")])
    read_footers([str(tmp_path / "e.parquet")], cfg, extra=[("g", "data.eval_group")])  # string groups: fine
    with pytest.raises(DataError, match=r"e.parquet: missing column 'user' \(data.eval_group\)"):
        read_footers([str(tmp_path / "e.parquet")], cfg, extra=[("user", "data.eval_group")])


def test_an_eval_group_that_cannot_group_rows_is_refused_from_the_footers(tmp_path):
    """A list column (or a float one) as data.eval_group is refused before training, not by the
    final eval's raw pyarrow error after the run has trained and saved."""
    pq.write_table(pa.table({"u": [1, 2], "l": [[1, 2], [3]], "f": [0.5, 1.5], "y": pa.array([0, 1], pa.int8())}),
                   tmp_path / "e.parquet")
    cfg = DataConfig(sparse=[SparseFeature("u", 5)], tasks=[Task("y")])
    for column, tp in (("l", r"list<element: int64>"), ("f", "double")):
        with pytest.raises(DataError, match=rf"column '{column}' \(data.eval_group\) has type {tp}; expected one "
                                            rf"integer or string/binary id per row \(.*a list cannot group rows\)"):
            read_footers([str(tmp_path / "e.parquet")], cfg, extra=[(column, "data.eval_group")])
    read_footers([str(tmp_path / "e.parquet")], cfg, extra=[("u", "data.eval_group")])


def test_uint64_ids_above_int64_are_measured_and_named(tmp_path):
    from data.reader import id_health
    big = [1, 2**63 + 5, 3, 2**64 - 1]
    pq.write_table(pa.table({"u": pa.array(big, pa.uint64()), "y": pa.array([0, 1, 0, 1], pa.int8())}),
                   tmp_path / "u.parquet")
    cfg = DataConfig(train=[str(tmp_path / "u.parquet")], sparse=[SparseFeature("u", 8)], tasks=[Task("y")],
                     num_workers=0, batch_size=4, id_policy="error")
    health = id_health(read_footers(cfg.train, cfg), cfg)["u"]  # used to raise ArrowInvalid, naming nothing
    assert health["remapped_share"] == 0.5 and health["sampled_distinct_ids"] == 4
    with pytest.raises(DataError, match=r"u\.parquet: column 'u' has id 9223372036854775813 outside \[0, 8\)"):
        list(DataSource(cfg.train, cfg, 0, 1).batches(0))


def test_weights_all_zero_train_nothing_and_the_run_says_so(tmp_path):
    import torch
    from trainer.errors import RunError
    from trainer.guard import NonFiniteGuard
    (batch,) = _weights(tmp_path / "zero.parquet", [0.0, 0.0, None, 0.0])  # every row of task y weighs 0
    guard = NonFiniteGuard(torch.device("cpu"), 1, ["y"])
    guard.observe(torch.zeros(1), batch.label_mask)
    with pytest.raises(RunError, match=r"task\(s\) y had no labelled row with a weight > 0 in steps 1-1"):
        guard.check_trained(1, 0)
    (batch,) = _weights(tmp_path / "some.parquet", [0.0, 0.5, None, 0.0])
    guard = NonFiniteGuard(torch.device("cpu"), 1, ["y"])
    guard.observe(torch.zeros(1), batch.label_mask)
    guard.check_trained(1, 0)  # one row with weight > 0: it trained
