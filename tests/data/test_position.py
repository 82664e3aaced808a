"""The data position of a step, and the rest of the epoch under another split: the rows the
readers of one split read before step k, plus the rows the readers of another split read from
the recorded position on, are every row of the epoch once (partly read units: read again or
left out, as counted). Row ids are a dense column, so every row read is identified."""
import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.position import Split, consumed, worker_batches_done
from data.reader import DataSource
from data.schema import DataConfig, SparseFeature, Task
from trainer.start import Position, Timeline, _resume_position

SIZES = [[310, 520, 170, 600], [450, 90, 380], [700, 260]]  # uneven row groups over three files


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("position")
    rid = 1  # 0 is the padding batch's value
    for f, groups in enumerate(SIZES):
        with pq.ParquetWriter(folder / f"part-{f}.parquet", pa.schema([("rid", pa.float64()), ("u", pa.int64()),
                                                                        ("y", pa.int8())])) as w:
            for n in groups:
                ids = np.arange(rid, rid + n, dtype=np.float64)
                w.write_table(pa.table({"rid": ids, "u": np.arange(n) % 5, "y": (np.arange(n) % 2).astype(np.int8)}),
                              row_group_size=n)
                rid += n
    return folder, rid - 1


def _sources(folder, split: Split):
    cfg = DataConfig(train=[str(folder)], sparse=[SparseFeature("u", 5)], dense=["rid"], tasks=[Task("y")],
                     dense_transform="none", batch_size=split.batch_size, num_workers=split.num_workers,
                     shuffle=split.shuffle, shuffle_seed=split.shuffle_seed, shuffle_buffer=split.shuffle_buffer)
    first = DataSource(cfg.train, cfg, 0, split.world_size, shuffle=split.shuffle)
    return [first] + [DataSource(cfg.train, cfg, r, split.world_size, footers=first.footers,
                                 transforms=first.transforms, shuffle=split.shuffle)
                      for r in range(1, split.world_size)]


def _rows(batches) -> list:
    return [int(v) for b in batches for v in b.dense_features[:, 0].tolist() if v > 0]


def _read(srcs, pos: Position, step: int, steps: int) -> list:
    """Row ids read by every rank from `step` (in the leg of `pos`) for `steps` steps."""
    return [r for s in srcs for r in _rows(itertools.islice(Timeline(s, pos).stream(step), steps))]


CASES = [  # (split before, split after, step, partial-unit rule)
    (Split(2, 1, 128), Split(1, 1, 128), 5, "reread"),
    (Split(1, 2, 100), Split(2, 1, 64), 13, "reread"),  # two DataLoader workers: their batches interleave
    (Split(2, 1, 96, True, 3, 700), Split(3, 1, 64, True, 3, 700), 6, "skip"),  # rows shuffled across units
    (Split(3, 3, 50), Split(2, 1, 80), 9, "reread"),
]


@pytest.mark.parametrize("before,after,k,rule", CASES)
def test_the_rest_of_the_epoch_under_another_split_reads_every_row_once(logs, before, after, k, rule):
    folder, n = logs
    srcs_a, srcs_b = _sources(folder, before), _sources(folder, after)
    first = _read(srcs_a, Position(), 0, k)
    record = Timeline(srcs_a[0], Position()).record(k)
    pos, resplit = _resume_position(k, record, {}, srcs_b[0], rule)
    rest = _read(srcs_b, pos, k, Timeline(srcs_b[0], pos).leg_end - k)
    seen = Counter(first + rest)
    assert resplit["partial_rule"] == rule and resplit["units_left"] == len(pos.units)
    assert max(seen.values()) <= 2 and set(seen) <= set(range(1, n + 1))
    twice = sum(1 for c in seen.values() if c == 2)
    missing = n - len(seen)
    assert twice == resplit["rows_trained_twice"] and missing == resplit["rows_skipped"]
    assert (twice if rule == "reread" else missing) > 0 or resplit["partial_units"] == 0
    if rule == "reread":
        assert missing == 0
    # the next epoch is whole, under the new split
    nxt = Timeline(srcs_b[0], pos)
    after_leg = _read(srcs_b, nxt.at(nxt.leg_end), nxt.leg_end, srcs_b[0].steps_per_epoch)
    assert sorted(after_leg) == list(range(1, n + 1))


def test_a_leg_resumed_under_a_third_split_still_reads_every_row_once(logs):
    folder, n = logs
    a, b, c = _sources(folder, Split(2, 1, 128)), _sources(folder, Split(1, 1, 100)), _sources(folder, Split(3, 1, 60))
    rows = _read(a, Position(), 0, 4)
    pos_b, first = _resume_position(4, Timeline(a[0], Position()).record(4), {}, b[0], "reread")
    rows += _read(b, pos_b, 4, 7)
    pos_c, resplit = _resume_position(11, Timeline(b[0], pos_b).record(11), {}, c[0], "reread")
    rows += _read(c, pos_c, 11, Timeline(c[0], pos_c).leg_end - 11)
    seen = Counter(rows)
    assert set(seen) == set(range(1, n + 1))
    assert sum(v - 1 for v in seen.values()) == first["rows_trained_twice"] + resplit["rows_trained_twice"]


def test_same_split_keeps_the_position_and_a_record_names_the_units(logs):
    folder, _ = logs
    srcs = _sources(folder, Split(2, 1, 128))
    timeline = Timeline(srcs[0], Position())
    pos, resplit = _resume_position(5, timeline.record(5), {}, srcs[0], "reread")
    assert resplit is None and pos == Position()
    spe = srcs[0].steps_per_epoch
    assert timeline.at(spe + 2) == Position(1, spe) and timeline.total(3) == 3 * spe
    import json
    # 2 batches of 128 per rank: each rank's first unit (row groups 0 and 1 of the first file) is partly read
    rec = json.loads(timeline.record(2))
    assert rec["consumed"] == {} and rec["partial_rows_read"] == 2 * 256
    assert rec["partial"] == {str(folder / "part-0.parquet"): [0, 1]}
    rec = json.loads(timeline.record(3))  # rank 0 has read 384 rows: its first unit (310) is consumed
    assert rec["consumed"] == {str(folder / "part-0.parquet"): [0]}


def test_a_checkpoint_without_a_position_record_resumes_by_its_step(logs):
    folder, n = logs
    old = {"world_size": 2, "data.num_workers": 1, "data.batch_size": 128}
    srcs_a, srcs_b = _sources(folder, Split(2, 1, 128)), _sources(folder, Split(1, 1, 128))
    spe = srcs_a[0].steps_per_epoch
    pos, resplit = _resume_position(spe + 3, None, old, srcs_b[0], "reread")
    assert pos.epoch == 1 and resplit["epoch"] == 1
    rows = _read(srcs_a, Position(1, spe), spe, 3) + _read(srcs_b, pos, spe + 3, Timeline(srcs_b[0], pos).leg_end - spe - 3)
    assert set(rows) == set(range(1, n + 1))


def test_dataloader_interleaving_model():
    assert worker_batches_done([3, 1, 2], 0) == [0, 0, 0]
    assert worker_batches_done([3, 1, 2], 4) == [2, 1, 1]
    assert worker_batches_done([3, 1, 2], 5) == [2, 1, 2]
    assert worker_batches_done([3, 1, 2], 6) == [3, 1, 2]
    c = consumed([0, 1, 2], [100, 100, 100], Split(1, 1, 64), 0, 3)  # 192 rows read
    assert c.units == [0] and c.partial == [1] and c.partial_rows_read == 92
