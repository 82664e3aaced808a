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
