"""Checks that need no training: config semantics, checkpoint discovery and retention, run
identity, disk space, and reader errors raised in a DataLoader worker."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import DataError
from data.reader import DataSource
from data.schema import DataConfig, SparseFeature, Task
from launch.config import ConfigError, load_config
from trainer import identity
from trainer.checkpoint import CheckpointDir
from trainer.errors import RunError
from trainer.preflight import check_disk

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, fragment", [
    ("trainer.epochs=0", "nothing to train"),
    ("trainer.max_steps=-3", "must be >= 0"),
    ("optim.dense='lamb'", "optim.dense 'lamb' unknown"),
    ("optim.sparse='adamw'", "optim.sparse 'adamw' unknown"),
    ("trainer.pg_timeout_s=0", "pg_timeout_s must be > 0"),
    ("data.nonfinite='drop'", "data.nonfinite must be"),
])
def test_config_semantics_are_config_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config("launch/configs/demo.toml", [override])


def test_malformed_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nepochs = = 2\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"step-{step:09d}"
    p.mkdir(parents=True)
    if complete:
        (p / ".metadata").write_bytes(b"x")
    return p


@pytest.mark.parametrize("pointer", [None, "", "step-000000030", "garbage"])
def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, complete=False)  # a save that died before .metadata
    if pointer is not None:
        (tmp_path / "latest").write_text(pointer)
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.latest() == str(tmp_path / "step-000000020")
    ckpts.prepare()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000010", "step-000000020"]


def test_no_checkpoint_is_none(tmp_path):
    assert CheckpointDir(tmp_path / "nothing").latest() is None


def test_disk_check_refuses_a_checkpoint_that_cannot_fit(tmp_path):
    with pytest.raises(RunError, match="GiB free"):
        check_disk(tmp_path, 2**60, 1, 3)
    check_disk(tmp_path, 1024, 2, 3)  # fits


def _ident(**changes):
    base = {"data.train": ["a"], "data.batch_size": 512, "world_size": 2, "optim.dense_lr": 0.001,
            "train_units": "x"}
    return {**base, **changes}


def test_resume_identity(tmp_path):
    identity.save(tmp_path, _ident())
    identity.check_resume(tmp_path, _ident(), allow_change=False)
    with pytest.raises(RunError, match=r"optim.dense_lr: 0.001 -> 0.01"):
        identity.check_resume(tmp_path, _ident(**{"optim.dense_lr": 0.01}), allow_change=False)
    identity.check_resume(tmp_path, _ident(**{"optim.dense_lr": 0.01}), allow_change=True)
    for key, value in (("train_units", "y"), ("data.train", ["b"])):
        with pytest.raises(RunError, match=f"(?s)on other training files: .*trainer.init_from.*\\n  - {key}: "):
            identity.check_resume(tmp_path, _ident(**{key: value}), allow_change=True)
    # another split is a resume under another split (trainer.start), not a change of config
    old = identity.check_resume(tmp_path, _ident(world_size=4, **{"data.batch_size": 1024}), allow_change=False)
    assert old == _ident()
    identity.save(tmp_path, {**_ident(), "parent": {"step": 3}, "architecture": {}})  # records, never compared
    identity.check_resume(tmp_path, _ident(), allow_change=False)
    # a run.json written before keys were added resumes under their defaults, not under others
    identity.check_resume(tmp_path, _ident(**identity.ADDED), allow_change=False)
    with pytest.raises(RunError, match="trainer.init_from: '' -> 'runs/a'"):
        identity.check_resume(tmp_path, _ident(**{**identity.ADDED, "trainer.init_from": "runs/a"}), allow_change=False)


def test_checkpoints_without_identity_are_refused(tmp_path):
    with pytest.raises(RunError, match="no run.json"):
        identity.check_resume(tmp_path, _ident(), allow_change=True)


def _dataset(tmp_path: Path, d0, labels) -> DataConfig:
    n = len(d0)
    t = pa.table({"id": pa.array(np.arange(n) % 7, pa.int64()), "d0": pa.array(d0, pa.float64()),
                  "y": pa.array(labels, pa.int8())})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=50)
    return DataConfig(train=[str(tmp_path)], eval=[str(tmp_path)], sparse=[SparseFeature("id", 7)],
                      dense=["d0"], tasks=[Task("y")], batch_size=16, num_workers=1)


def _read_all(cfg: DataConfig):
    return list(DataSource(cfg.train, cfg, 0, 1).batches(cfg.num_workers))


def test_inf_in_a_worker_is_a_data_error_naming_the_place(tmp_path):
    d0 = [0.5] * 200
    d0[130] = 1e300  # beyond float32: inf after the cast
    cfg = _dataset(tmp_path, d0, [0, 1] * 100)
    with pytest.raises(DataError) as e:
        _read_all(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'a.parquet'}: dense column 'd0' has value 1e+300 (row 30 of row group 2)")
    assert "Caught" not in msg and "Traceback" not in msg


def test_bad_label_deep_in_a_file_is_the_first_line_of_the_cli_error(tmp_path):
    labels = [0, 1] * 100
    labels[170] = 3
    _dataset(tmp_path, [0.5] * 200, labels)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'''[data]
train = ["{tmp_path}"]
eval = ["{tmp_path}"]
sparse = [{{name = "id", num_embeddings = 7}}]
dense = ["d0"]
tasks = [{{name = "y"}}]
batch_size = 16
[model]
embedding_dim = 4
dense_arch = [4]
cross_layers = 1
cross_low_rank = 4
shared_arch = [4]
head_arch = [4]
[trainer]
out_dir = "{tmp_path}/run"
progress_bar = false
''')
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"MASTER_PORT": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "Error" in line]
    assert errors and "label column 'y' has value 3 (row 20 of row group 3)" in errors[0], proc.stderr[-2000:]
    assert "Caught DataError" not in proc.stderr



def test_out_dir_that_cannot_be_written_is_refused(tmp_path):
    from trainer.preflight import check_writable
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(RunError, match="trainer.out_dir .*taken/run is not writable"):
        check_writable(tmp_path / "taken" / "run")


@pytest.mark.parametrize("setting, local_rank, local_world, gpus, expected", [
    ("auto", 1, 2, 0, "cpu"), ("cpu", 1, 2, 8, "cpu"), ("auto", 3, 8, 8, "cuda:3"), ("cuda", 0, 1, 1, "cuda:0"),
    ("auto", 1, 2, 1, "2 ranks on this machine but 1 visible GPU"), ("cuda", 0, 1, 0, "no CUDA device"),
    ("tpu", 0, 1, 0, "trainer.device must be one of"),
])
def test_ranks_map_to_visible_devices(setting, local_rank, local_world, gpus, expected):
    from trainer.build import pick_device
    if ":" in expected or expected == "cpu":
        assert str(pick_device(setting, local_rank, local_world, gpus)) == expected
    else:
        with pytest.raises(RunError, match=expected):
            pick_device(setting, local_rank, local_world, gpus)
