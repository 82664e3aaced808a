from launch.config import RunConfig, from_dict
from data.bench import format_table, run


def test_bench_data_reports_reader_and_pyarrow_rates(tiny_config):
    cfg = from_dict(RunConfig, tiny_config)
    r = run(cfg.data, workers=2, rounds=2)
    assert r["rows"] == 12_000
    for k in ("pyarrow_decode", "pyarrow_decode_to_numpy", "reader_1_process", "reader_2_workers"):
        assert r[k] > 0
    assert r["reader_vs_pyarrow_decode"] == r["reader_1_process"] / r["pyarrow_decode"]
    assert 0 < r["reader_vs_pyarrow_decode_paired"] < 10
    assert "reader_1_process" in format_table(r)


def test_string_copy_reads_as_the_same_rows_with_hashed_ids(tiny_config, tmp_path):
    from data.bench import strings_copy
    from data.reader import DataSource
    cfg = from_dict(RunConfig, tiny_config).data
    copy = strings_copy(cfg, str(tmp_path / "strings"))
    a, b = DataSource(cfg.train, cfg, 0, 1), DataSource(copy.train, copy, 0, 1)
    assert a.unit_rows == b.unit_rows
    from data.batch import COUNTERS
    ids = sum(batch.sparse_features.values().numel() for batch in b.epoch())
    assert int(b.counters[COUNTERS.index("ids_hashed")]) == ids > 0  # every id came as a string, hashed
    r = run(copy, workers=0, rounds=1)
    assert r["rows"] == 12_000 and r["reader_1_process"] > 0
