import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import COUNTERS
from data.errors import DataError
from data.hashing import hash_ids
from data.reader import DataSource, batches_per_rank
from data.schema import DataConfig, SparseFeature, Task


def write(path, n, start=0, row_group_size=7, **overrides):
    """Rows with a unique row_id (a dense column, so it comes back in every batch)."""
    rid = np.arange(start, start + n)
    cols = {
        "row_id": pa.array(rid.astype(np.float64)),
        "x": pa.array(np.where(rid % 5 == 0, np.nan, rid * 0.5), mask=(rid % 5 == 0)),
        "uid": pa.array(rid % 50, pa.int64()),
        "hist": pa.array([[int(r % 13), int(r % 7)][: r % 3] for r in rid], pa.list_(pa.int64())),
        "click": pa.array((rid % 2).astype(np.int8)),
        "cvr": pa.array((rid % 4 == 1).astype(np.int8), mask=(rid % 2 == 0)),
    }
    cols.update(overrides)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def config(files, **kw):
    base = dict(train=[str(f) for f in files], sparse=[SparseFeature("uid", 50), SparseFeature("hist", 13)],
                dense=["row_id", "x"], tasks=[Task("click"), Task("cvr")], batch_size=8, num_workers=2,
                dense_transform="none", dense_fill=0.0)  # raw values: row_id names the row
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def files(tmp_path):
    out = []
    for i, n in enumerate([40, 23, 61]):
        p = tmp_path / f"f{i}.parquet"
        write(p, n, start=1000 * i)
        out.append(p)
    return out


def read_all(cfg, rank, world):
    src = DataSource(cfg.train, cfg, rank, world)
    batches = list(src.epoch())
    return src, batches


def test_every_row_exactly_once_across_2_ranks_x_2_workers(files):
    cfg = config(files)
    seen, steps = [], set()
    for rank in range(2):
        src, batches = read_all(cfg, rank, 2)
        steps.add(len(batches))
        real = [b for b in batches if b.label_mask.sum() > 0 or b.dense_features[:, 0].sum() > 0]
        assert len(real) == src.rank_batches[rank]
        for b in real:
            assert b.dense_features.shape[0] <= cfg.batch_size
            seen.extend(b.dense_features[:, 0].long().tolist())
    expected = list(range(0, 40)) + list(range(1000, 1023)) + list(range(2000, 2061))
    assert sorted(seen) == expected  # nothing lost, nothing twice
    assert len(steps) == 1  # both ranks step the same number of times (padding)


def test_batch_counts_follow_from_footers():
    # 3 units of 10, 10, 5 rows; 2 ranks x 1 worker; batch 4: rank 0 gets 15 rows -> 4 batches
    assert batches_per_rank([10, 10, 5], 2, 1, 4) == [4, 3]


def test_values_masks_and_counters(files):
    cfg = config(files[:1], num_workers=0, batch_size=100)
    src, (batch,) = read_all(cfg, 0, 1)
    rid = batch.dense_features[:, 0].long()
    x = batch.dense_features[:, 1]
    assert (x[rid % 5 == 0] == 0).all()  # nulls filled with dense_fill
    torch.testing.assert_close(x[rid % 5 != 0], rid[rid % 5 != 0] * 0.5)
    assert (batch.label_mask[:, 0] == 1).all()
    torch.testing.assert_close(batch.label_mask[:, 1], (rid % 2 == 1).float())  # null cvr -> masked
    torch.testing.assert_close(batch.labels[:, 1], ((rid % 4 == 1)).float())
    kjt = batch.sparse_features.to_dict()
    torch.testing.assert_close(kjt["uid"].values(), rid % 50)
    torch.testing.assert_close(kjt["hist"].lengths(), (rid % 3).int())
    c = dict(zip(COUNTERS, src.counters.tolist()))
    assert c["dense_filled"] == 8 and c["rows"] == 40


def test_hash_policy_remaps_and_counts(tmp_path):
    p = tmp_path / "bad.parquet"
    write(p, 10, uid=pa.array([-5, 3, 99, 2**40, 1, 2, 3, 4, 5, 6], pa.int64()))
    src, batches = read_all(config([p], num_workers=0, batch_size=10), 0, 1)
    ids = batches[0].sparse_features.to_dict()["uid"].values()
    assert ((ids >= 0) & (ids < 50)).all()
    assert ids[0] == int(hash_ids(np.array([-5]), 50)[0]) and ids[1] == 3
    assert dict(zip(COUNTERS, src.counters.tolist()))["ids_remapped"] == 3


@pytest.mark.parametrize("column,value,match", [
    ("uid", pa.array([1, 2, 3, 77] + [0] * 6, pa.int64()), "column 'uid' has id 77 outside"),
    ("click", pa.array([0, 1, 2, 0, 0, 0, 0, 0, 0, 0], pa.int8()), "label column 'click' has value 2"),
    ("uid", pa.array([0.5] * 10), "column 'uid' .* has type double"),
    ("x", pa.array(["a"] * 10), "column 'x' .* has type string"),
])
def test_bad_input_names_file_and_column(tmp_path, column, value, match):
    p = tmp_path / "bad.parquet"
    write(p, 10, **{column: value})
    with pytest.raises(DataError, match=match) as e:
        read_all(config([p], num_workers=0, id_policy="error"), 0, 1)
    assert str(p) in str(e.value)


def test_missing_file_and_column(tmp_path, files):
    with pytest.raises(DataError, match="nope.parquet: no such"):
        DataSource([str(tmp_path / "nope.parquet")], config(files), 0, 1)
    cfg = config(files, dense=["row_id", "missing_col"])
    with pytest.raises(DataError, match=r"f0.parquet: missing column 'missing_col'"):
        DataSource(cfg.train, cfg, 0, 1)


def test_bad_input_in_a_worker_process_still_names_the_file(tmp_path):
    p = tmp_path / "bad.parquet"
    write(p, 10, click=pa.array([0, 1, 3, 0, 0, 0, 0, 0, 0, 0], pa.int8()))
    with pytest.raises(Exception, match=r"bad.parquet: label column 'click' has value 3"):
        read_all(config([p], num_workers=1), 0, 1)


class _Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        time.sleep(30)
        yield os.getppid()


class _Parent(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.getppid()


def test_workers_come_from_a_forkserver_not_from_the_rank():
    """A worker forked from a multi-threaded rank can deadlock on a lock held at the fork: the
    readers' workers are forked from a forkserver, so their parent is not this process."""
    from data.reader import worker_context
    loader = torch.utils.data.DataLoader(_Parent(), batch_size=None, num_workers=1,
                                         multiprocessing_context=worker_context())
    (parent,) = list(loader)
    assert parent != os.getpid()


def test_a_silent_worker_is_a_data_error_not_a_hang(monkeypatch):
    import data.reader as reader
    monkeypatch.setattr(reader, "WORKER_TIMEOUT_S", 2.0)
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=None, num_workers=1, timeout=2.0,
                                         multiprocessing_context=reader.worker_context())
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="no batch from a DataLoader worker in 2 s"):
        list(reader._within_timeout(iter(loader)))
    assert time.perf_counter() - t0 < 25
