"""Bad inputs that used to end in a traceback, or a library's assertion on one rank: each is now a
clear error naming what is wrong, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import DataError
from launch.config import ConfigError, RunConfig, from_dict
from trainer.errors import RunError

ROOT = Path(__file__).resolve().parents[2]


def test_an_unwritable_out_dir_is_the_first_line(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", "launch/configs/demo.toml", "--set",
                        f"trainer.out_dir={tmp_path / 'a_file' / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert "ERROR" in first and "is not writable" in first, r.stderr[-2000:]


def test_table_dims_fbgemm_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="data.tables item: dim 7 is not a multiple of 4"):
        from_dict(RunConfig, {"data": {"tables": [{"name": "item", "num_embeddings": 10, "dim": 7}],
                                       "sparse": [{"name": "a", "table": "item"}]}})
    with pytest.raises(ConfigError, match="model.embedding_dim 6 must be a positive multiple of 4"):
        from_dict(RunConfig, {"model": {"embedding_dim": 6}})


def test_no_task_is_refused():
    from trainer.preflight import check_data
    with pytest.raises(RunError, match="data.tasks is empty"):
        check_data(None, None, [])


def test_schema_on_what_is_not_parquet_is_named(tmp_path):
    from data.draft import draft
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: cannot read as Parquet"):
        draft([str(tmp_path / "x.parquet")])


def test_plan_on_no_nodes_is_refused():
    from trainer.tools.plan import simulate
    with pytest.raises(RunError, match=r"--nodes \(0\)"):
        simulate(RunConfig(), 0, 8, 80.0)


def test_a_table_no_tensor_can_hold_is_refused_by_the_config():
    for section in ({"sparse": [{"name": "u", "num_embeddings": 10**18}]},
                    {"tables": [{"name": "t", "num_embeddings": 10**18}], "sparse": [{"name": "u", "table": "t"}]}):
        with pytest.raises(ConfigError, match="num_embeddings 1e\\+18 is more than 1.41e\\+14 rows"):
            from_dict(RunConfig, {"data": section})


def test_small_checkpoints_are_sized_in_mib():
    from trainer.preflight import _size
    assert _size(5 * 2**20) == "5.00 MiB" and _size(3 * 2**30) == "3.00 GiB"
