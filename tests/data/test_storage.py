"""Parquet logs on object storage, through a real S3-protocol server on 127.0.0.1 (moto's
server mode, a subprocess): listing, globs over date partitions, errors naming the URI, and a
2-rank run from s3:// that ends exactly as the same run from the local copy."""
import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import DataError
from data.footers import read_footers
from data.schema import DataConfig
from data.storage import glob_regex, resolve_files
from tests.s3_server import s3_server, upload

pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_synth):
    """The tiny dataset, and a date-partitioned layout, in s3://logs/."""
    parts = tmp_path_factory.mktemp("parts")
    for day in ("2026-11-19", "2026-11-20", "2026-11-21"):
        (parts / f"dt={day}").mkdir()
        for i in range(2):
            pq.write_table(pa.table({"x": [1.0, 2.0], "y": [0, 1], "id": ["a", "b"]}),
                           parts / f"dt={day}" / f"part-{i}.parquet")
        (parts / f"dt={day}" / "_SUCCESS").write_text("")
    with s3_server() as endpoint:
        upload(tiny_synth.out_dir, "logs/tiny", endpoint)
        upload(str(parts), "logs/parts", endpoint)
        yield endpoint, parts


def test_glob_regex():
    rx = glob_regex("logs/dt=2026-11-2[01]/*.parquet")
    assert rx.match("logs/dt=2026-11-20/part-0.parquet") and not rx.match("logs/dt=2026-11-19/part-0.parquet")
    assert not rx.match("logs/dt=2026-11-20/sub/part-0.parquet")  # * stays within a directory
    assert glob_regex("logs/**/*.parquet").match("logs/a/b/c.parquet")


def test_date_partitions_by_glob_local_and_s3(s3):
    _, parts = s3
    local = resolve_files([f"{parts}/dt=2026-11-2*/*.parquet"])
    remote = resolve_files(["s3://logs/parts/dt=2026-11-2*/*.parquet"])
    tail = lambda p: "dt=" + p.split("/dt=")[1]
    assert [tail(p) for p in local] == [tail(p) for p in remote] == [
        "dt=2026-11-20/part-0.parquet", "dt=2026-11-20/part-1.parquet",
        "dt=2026-11-21/part-0.parquet", "dt=2026-11-21/part-1.parquet"]
    assert remote[0] == "s3://logs/parts/dt=2026-11-20/part-0.parquet"
    # a directory: its Parquet files, not the writer's _SUCCESS markers
    assert len(resolve_files(["s3://logs/parts"])) == 6


def test_unreachable_uris_are_named(s3):
    with pytest.raises(DataError, match="s3://no-such-bucket/logs: bucket 'no-such-bucket' does not exist"):
        resolve_files(["s3://no-such-bucket/logs"])
    # a glob over date directories, as the README writes it: their Parquet files, no side files
    found = resolve_files(["s3://logs/parts/dt=2026-11-2*/"])
    assert len(found) == 4 and all(f.endswith(".parquet") for f in found)
    with pytest.raises(DataError, match=r"s3://logs/tiny/nothing-\*.parquet: no such"):
        resolve_files(["s3://logs/tiny/nothing-*.parquet"])
    bad = "s3://logs/tiny/train?endpoint_override=127.0.0.1:1&scheme=http"  # nothing listens there
    with pytest.raises(DataError, match=r"s3://logs/tiny/train\?endpoint_override=127.0.0.1:1.*cannot"):
        resolve_files([bad])


def test_footers_from_s3_equal_local(s3, tiny_synth):
    from data.synth import data_section
    from launch.config import from_dict
    cfg = from_dict(DataConfig, data_section(tiny_synth))
    local, remote = read_footers(cfg.train, cfg), read_footers(["s3://logs/tiny/train"], cfg)
    assert remote.unit_rows == local.unit_rows and remote.labels == local.labels
    assert remote.ranges == local.ranges and len(remote.files) == 2


def _train(raw):
    from launch.config import RunConfig, from_dict
    from trainer.loop import train
    return train(from_dict(RunConfig, raw))


def test_two_ranks_train_from_s3_as_from_the_local_copy(s3, tiny_config, tmp_path):
    """Data from s3://, checkpoints to s3://: 3 steps, a resume from the checkpoint on S3, 3 more,
    end exactly as 6 steps straight through on local files."""
    from tests.dist_utils import run_ranks
    tiny_config["trainer"].update(max_steps=6, log_every=3)
    remote = copy.deepcopy(tiny_config)
    remote["data"].update(train=["s3://logs/tiny/train"], eval=["s3://logs/tiny/eval/*.parquet"])
    remote["trainer"].update(out_dir=str(tmp_path / "remote"), checkpoint_dir="s3://logs/runs/remote/ckpt", max_steps=3)
    a = run_ranks(_train, (tiny_config,))
    run_ranks(_train, (remote,))
    remote["trainer"]["max_steps"] = 6
    b = run_ranks(_train, (remote,))
    assert a[0]["eval"] == b[0]["eval"] == b[1]["eval"]  # exactly: same rows, same order, exact resume
    assert a[0]["final_weights"] == b[0]["final_weights"]
    assert b[0]["eval_files"] == ["s3://logs/tiny/eval/part-00000.parquet"]
    assert b[0]["id_health"] == a[0]["id_health"] and set(b[0]["id_health"]) == {
        f["name"] for f in tiny_config["data"]["sparse"]}
    assert (tmp_path / "remote" / "dense_stats.json").is_file()  # the transforms' numbers, for eval and resume
    from trainer.checkpoint import CheckpointDir
    ckpts = CheckpointDir("s3://logs/runs/remote/ckpt")
    assert [c.rsplit("/", 1)[1] for c in ckpts.complete()] == ["step-000000003", "step-000000006"]
    assert ckpts.latest() == "s3://logs/runs/remote/ckpt/step-000000006"


def _warm_start_from_s3(raw: dict, root: str):
    """A parent whose checkpoints are on S3 and whose out_dir is gone; a child warm-started from
    the S3 checkpoint directory alone (run.json and the dense transforms are beside it)."""
    import shutil
    parent = copy.deepcopy(raw)
    parent["trainer"].update(out_dir=f"{root}/parent", checkpoint_dir="s3://logs/runs/daily/2026-12-01", max_steps=3)
    _train(parent)
    shutil.rmtree(f"{root}/parent")
    child = copy.deepcopy(raw)
    child["trainer"].update(out_dir=f"{root}/child", init_from="s3://logs/runs/daily/2026-12-01", max_steps=2)
    return _train(child)


def test_warm_start_from_a_checkpoint_directory_on_s3(s3, tiny_config, tmp_path):
    from tests.dist_utils import run_ranks
    summary = run_ranks(_warm_start_from_s3, (tiny_config, str(tmp_path)), world=1)[0]
    assert summary["steps"] == 2 and summary["start"]["from"] == "parent"
    assert summary["start"]["checkpoint"] == "s3://logs/runs/daily/2026-12-01/step-000000003"
    assert summary["start"]["parent_step"] == 3
    run = json.loads((tmp_path / "child" / "run.json").read_text())
    assert run["parent"]["checkpoint"] == summary["start"]["checkpoint"] and run["parent"]["transforms"] == "parent"


def _score_on_s3(raw: dict, root: str):
    """Trains 3 steps (eval predictions kept), then scores the eval split read from s3:// into s3://."""
    from launch.config import RunConfig, from_dict
    from trainer.serving.predict import predict
    run = copy.deepcopy(raw)
    run["trainer"].update(out_dir=f"{root}/run", max_steps=3, save_predictions=True)
    _train(run)
    return predict(from_dict(RunConfig, run), f"{root}/run", ["s3://logs/tiny/eval"], "s3://logs/scores/day1",
                   ["user_id"])


def test_predict_reads_and_writes_object_storage(s3, tiny_config, tmp_path):
    import numpy as np
    import pyarrow.fs as pafs
    from tests.dist_utils import run_ranks
    summary = run_ranks(_score_on_s3, (tiny_config, str(tmp_path)), world=1)[0]
    assert summary["rows"] == 6000 and summary["files"] == ["s3://logs/tiny/eval/part-00000.parquet"]
    fs = pafs.S3FileSystem(endpoint_override=s3[0])
    part = pq.read_table("logs/scores/day1/part-00000.parquet", filesystem=fs)
    want = np.load(tmp_path / "run" / "eval_predictions.rank0.npy")[:6000, :3]
    got = np.stack([part.column(f"pred_{t}").to_numpy() for t in ("ctr", "cvr", "conv")], 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert fs.get_file_info("logs/scores/day1/_summary.json").type == pafs.FileType.File


def test_unwritable_remote_checkpoint_dir_is_named(s3):
    from trainer.checkpoint import CheckpointDir
    from trainer.errors import CheckpointError
    with pytest.raises(CheckpointError, match="checkpoint directory s3://no-such-bucket/ckpt is not writable"):
        CheckpointDir("s3://no-such-bucket/ckpt").prepare()
