"""`mbrec schema`: raw logs (string ids, raw numerics, 0/1 labels) -> a [data] section that
loads and trains as drafted."""
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from data.draft import draft, run_name, table_rows


def raw_logs(path, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 500, n)
    pq.write_table(pa.table({
        "user": pa.array([f"user-{u}" for u in user]),
        "item_id": rng.integers(0, 10**9, 400)[rng.integers(0, 400, n)],  # ids as large as they come
        "event_id": np.arange(n) * 7919,  # one per row: not a feature
        "hist": pa.array([[f"i{j}" for j in rng.integers(0, 50, k)] for k in rng.integers(0, 4, n)]),
        "price": rng.lognormal(4, 2, n),
        "year": rng.integers(1990, 2021, n),
        "score": rng.normal(0, 1, n),
        "click": (rng.random(n) < 0.2).astype(np.int8),
        "like": pa.array((rng.random(n) < 0.05).astype(np.int8), mask=rng.random(n) < 0.3),
        "note": pa.array([{"a": 1}] * n),
        "plan_code": rng.integers(0, 3, n),  # a 3-valued code, not named like one
        "level": rng.integers(1, 6, n),  # 5 values: a code
        "event_time": 1_764_000_000 + np.arange(n) * 60,  # epoch seconds
        "ts_ms": 1_764_000_000_000 + np.arange(n),
        "age": rng.integers(17, 91, n),  # quantities: many values, or a name that says so
        "weeks worked in year": rng.integers(0, 53, n),
        "num_employees": rng.integers(0, 7, n),
    }), path, row_group_size=1000)


def test_table_rows_keep_collisions_under_one_percent():
    from data.draft import colliding_share, estimate_distinct
    assert estimate_distinct(100, 10_000, 10**6) == 125  # a vocabulary mostly seen: x1.25
    assert estimate_distinct(9_000, 10_000, 10**6) == 900_000  # mostly new ids: extrapolated
    for distinct, sampled, total in ((100, 10_000, 10**6), (386, 5_000, 50_000), (9_000, 10_000, 100_000)):
        rows = table_rows(distinct, sampled, total)
        assert colliding_share(estimate_distinct(distinct, sampled, total), rows) <= 0.01 < colliding_share(
            estimate_distinct(distinct, sampled, total), rows // 2)
    assert colliding_share(386, 2 * 386) == pytest.approx(0.39, abs=0.01)  # the old 2 x D: the birthday bound
    assert table_rows(10**7, 10**7, 10**12) == 50_000_000  # capped
    assert table_rows(40, 10_000, 10**6, max_id=30_000) == 37_502  # integer ids up to 30,000 map to themselves
    assert table_rows(40, 10_000, 10**6, max_id=10**9) == table_rows(40, 10_000, 10**6)  # sparse ids: hashed


def test_schema_drafts_a_config_that_trains(tmp_path):
    (tmp_path / "logs").mkdir()
    raw_logs(tmp_path / "logs" / "a.parquet")
    out = subprocess.run([sys.executable, "-m", "launch.cli", "schema", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    drafted = tomllib.loads(out.stdout)
    data = drafted["data"]
    # a whole config: its own out_dir (never the demo's), shuffling on, the other sections written out
    assert re.fullmatch(r"runs/logs-[0-9a-f]{6}", drafted["trainer"]["out_dir"]) and data["shuffle"] is True
    assert "trainer.out_dir = runs/logs-" in out.stderr and "trainer.epochs = 1" in out.stderr  # said, not only written
    assert "# passes over data.train: 1, the default, chosen by the draft" in out.stdout
    assert {"model", "balancer", "optim", "trainer"} <= set(drafted)
    assert data["dense"] == ["price", "year", "score", "age", "weeks worked in year", "num_employees"]
    assert "7 distinct: a quantity by its name" in out.stdout
    assert [f["name"] for f in data["sparse"]] == ["user", "item_id", "hist", "plan_code", "level"]
    assert "# not used: event_time (int64 in [1.764e+09" in out.stdout and "a range of epoch seconds, and its name" \
        in out.stdout and "# not used: ts_ms" in out.stdout and "looks like a time column" in out.stdout
    assert "with 5 distinct values in [1, 5]: a code" in out.stdout
    like = next(line for line in out.stdout.splitlines() if '"like"' in line)
    assert " null (" in like and "no null" not in like  # nulls counted, never rounded away
    assert [t["name"] for t in data["tasks"]] == ["click", "like"]
    assert "# not used: note" in out.stdout and "auto = log1p + standardize" in out.stdout
    assert "# not used: event_id (int64, 3,000 distinct in 3,000 rows: one value per row" in out.stdout
    cfg = tmp_path / "drafted.toml"
    cfg.write_text(out.stdout)
    run = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(cfg), "--set", "data.batch_size=256",
                          "--set", f"trainer.out_dir={tmp_path / 'run'}", "--set", "trainer.max_steps=6",
                          "--set", "trainer.progress_bar=false"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_drafts_of_two_datasets_in_folders_of_one_name_get_two_runs(tmp_path):
    for ds in ("adult", "census"):
        (tmp_path / ds / "train").mkdir(parents=True)
    a, b = run_name([str(tmp_path / "adult" / "train")]), run_name([str(tmp_path / "census" / "train/")])
    assert a.startswith("train-") and b.startswith("train-") and a != b
    assert run_name([str(tmp_path / "adult" / "train")]) == a  # the same data: the same run
    assert run_name(["s3://logs/day=*/part-*.parquet"]).startswith("part-")


def test_a_column_some_files_lack_is_said_with_the_files(tmp_path):
    both = {"x": [1.5, 2.5] * 500, "y": pa.array([0, 1] * 500, pa.int8()), "hist": [[1, 2], [3]] * 500}
    pq.write_table(pa.table(both), tmp_path / "a.parquet")
    pq.write_table(pa.table({**both, "late": [0.5, 3.5] * 500}), tmp_path / "b.parquet")
    text = draft([str(tmp_path)])
    late = next(line for line in text.splitlines() if '"late"' in line)
    assert f"ABSENT from 1 of 2 file(s) ({tmp_path / 'a.parquet'})" in late
    for column in ('"x"', '"hist"'):  # (a list column's Parquet leaf is not its name: present in both)
        assert "ABSENT" not in next(line for line in text.splitlines() if column in line)
