"""Runs that must not exit 0 with a wrong result, and must not lose work: each scenario on
2 gloo ranks (one spawn for all of them), through `trainer.loop.train`."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks
from tests.trainer.test_distributed_training import auc
from launch.report import normalized_entropy


def _table(tiny_synth, split: str) -> pa.Table:
    return pq.read_table(sorted((Path(tiny_synth.out_dir) / split).glob("*.parquet"))[0])


def _write(table: pa.Table, path: Path, row_groups=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if row_groups is None:
        pq.write_table(table, path)
    else:  # row groups of the given sizes
        with pq.ParquetWriter(path, table.schema) as w:
            start = 0
            for n in row_groups:
                w.write_table(table.slice(start, n))
                start += n
    return str(path)


def _replace(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=table.schema.field(name).type))


def _scenarios(tiny_synth, tmp: Path):
    """name -> (overrides, expected): expected is an error type and a message fragment, or None."""
    train, ev = _table(tiny_synth, "train"), _table(tiny_synth, "eval")
    empty = _write(train.slice(0, 0), tmp / "empty" / "a.parquet")
    no_groups = tmp / "nogroups" / "a.parquet"
    no_groups.parent.mkdir(parents=True)
    pq.ParquetWriter(no_groups, train.schema).close()
    null_cvr = _write(_replace(train, "cvr", [None] * train.num_rows), tmp / "nullcvr" / "a.parquet")
    i = train.schema.get_field_index("cvr")  # a float label column, NaN everywhere
    nan_cvr = _write(train.set_column(i, "cvr", pa.array([float("nan")] * train.num_rows, pa.float32())),
                     tmp / "nancvr" / "a.parquet")
    huge = _write(_replace(train, "d3", [3e38] * train.num_rows), tmp / "huge" / "a.parquet")
    inf = _write(_replace(train, "d1", [float("inf")] + [0.5] * (train.num_rows - 1)), tmp / "inf" / "a.parquet")
    no_pos = _replace(_replace(ev, "conv", [0] * ev.num_rows), "cvr", [None] * ev.num_rows)
    no_pos = _write(no_pos, tmp / "nopos" / "a.parquet")  # conv: no positive; cvr: no labelled row
    other = _write(train.slice(0, 3000), tmp / "other" / "a.parquet")
    uneven = _write(ev.slice(0, 300), tmp / "uneven" / "a.parquet", row_groups=[100, 150, 50])
    blocked = tmp / "blocked"
    (blocked / "checkpoints").parent.mkdir(parents=True)
    (blocked / "checkpoints").write_text("a file where the checkpoint directory should be")
    return {
        # alone in its spawn: a run that stops mid-training leaves collectives in flight
        # fed raw (no transform): 3e38 overflows the first layer to inf, and the losses to NaN
        "nan_loss": ([f"data.train=['{huge}']", "trainer.checkpoint_every=2", "data.dense_transform='none'"],
                     ("NonFiniteError", "non-finite loss")),
        "empty": ([f"data.train=['{empty}']"], ("RunError", "data.train has no rows")),
        "no_row_groups": ([f"data.train=['{no_groups}']"], ("RunError", "data.train has no rows")),
        "null_labels": ([f"data.train=['{null_cvr}']"], ("RunError", "task 'cvr': every label in data.train is null")),
        # NaN labels are values to the footers: caught by what training saw (no labelled row)
        "nan_labels": ([f"data.train=['{nan_cvr}']"], ("RunError", "task(s) cvr had no labelled row")),
        "inf_filled": ([f"data.train=['{inf}']", "data.nonfinite='fill'"], None),
        "no_positives": ([f"data.eval=['{no_pos}']"], None),
        "uneven_eval": ([f"data.eval=['{uneven}']", "trainer.save_predictions=true"], None),
        "blocked_checkpoints": ([f"trainer.out_dir='{blocked}'"], ("CheckpointError", "is not writable")),
        "sgd": (["optim.sparse='sgd'", "trainer.checkpoint_every=4"], None),
        "sgd_resumed": (["optim.sparse='sgd'", "trainer.max_steps=12"], None),
        "changed": (["optim.sparse='sgd'", "trainer.max_steps=12", "optim.dense_lr=0.01"],
                    ("RunError", "optim.dense_lr: 0.003 -> 0.01")),
        "files_changed": (["optim.sparse='sgd'", "trainer.max_steps=16", f"data.train=['{other}']"],
                          ("RunError", "on other training files: ")),
        "finished": (["optim.sparse='sgd'", "trainer.max_steps=12"], ("AlreadyFinished", "holds a finished run")),
        # a restart after the final checkpoint but before summary.json: eval and summary, no step
        "completes": (["optim.sparse='sgd'", "trainer.max_steps=12"], None),
        # torchrun restarting a job that had finished: its summary stands, exit 0
        "finished_restart": (["optim.sparse='sgd'", "trainer.max_steps=12"], None),
        "keep": (["trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"], None),
    }


SAME_DIR = {"sgd_resumed": "sgd", "changed": "sgd", "files_changed": "sgd", "finished": "sgd", "completes": "sgd",
            "finished_restart": "sgd"}


def _run_all(raw: dict, scenarios: dict, root: str):
    from trainer.loop import train
    out = {}
    for name, (overrides, _) in scenarios.items():
        if name == "completes":
            _drop_summary(Path(root) / "sgd")
        r = apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir='{root}/{SAME_DIR.get(name, name)}'", *overrides])
        os.environ["TORCHELASTIC_RESTART_COUNT"] = "1" if name == "finished_restart" else "0"
        try:
            out[name] = ("ok", train(from_dict(RunConfig, r)))
        except Exception as e:  # reported, and compared with what the scenario expects
            out[name] = (type(e).__name__, str(e))
    return out


def _drop_summary(out: Path) -> None:
    import torch.distributed as dist
    if dist.get_rank() == 0:
        (out / "summary.json").unlink()
    dist.barrier()


@pytest.fixture(scope="module")
def outcomes(tiny_synth, tmp_path_factory):
    from tests.conftest import tiny_config
    tmp = tmp_path_factory.mktemp("trust")
    raw = tiny_config.__wrapped__(tiny_synth, tmp)
    raw["trainer"].update(max_steps=8, log_every=2)
    scenarios = _scenarios(tiny_synth, tmp)
    first = dict(list(scenarios.items())[:1])
    rest = dict(list(scenarios.items())[1:])
    results = [{**a, **b} for a, b in zip(run_ranks(_run_all, (raw, first, str(tmp))),
                                          run_ranks(_run_all, (raw, rest, str(tmp))))]
    assert results[0].keys() == results[1].keys()
    for name in scenarios:  # both ranks end the same way
        assert results[0][name][0] == results[1][name][0], (name, results[0][name], results[1][name])
    return scenarios, results[0], tmp


@pytest.mark.parametrize("name", ["empty", "no_row_groups", "null_labels", "nan_loss", "blocked_checkpoints",
                                  "changed", "files_changed", "finished",
                                  "nan_labels"])
def test_bad_runs_fail_with_a_named_error(outcomes, name):
    scenarios, got, _ = outcomes
    kind, fragment = scenarios[name][1]
    assert got[name][0] == kind and fragment in got[name][1], got[name]


def test_nan_loss_writes_no_checkpoint(outcomes):
    _, got, tmp = outcomes
    assert "between step" in got["nan_loss"][1]
    assert not list((tmp / "nan_loss" / "checkpoints").glob("step-*"))
    assert not (tmp / "nan_loss" / "summary.json").exists()


def test_inf_filled_and_counted(outcomes):
    _, got, _ = outcomes
    kind, summary = got["inf_filled"]
    assert kind == "ok" and summary["train_reader"]["dense_nonfinite"] == 1
    assert all(np.isfinite(summary["eval"][t]["ne"]) for t in ("ctr", "cvr", "conv"))


def test_task_without_positives_reports_null(outcomes):
    _, got, _ = outcomes
    kind, summary = got["no_positives"]
    assert kind == "ok" and summary["eval"]["conv"]["ne"] is None and summary["eval"]["conv"]["auc"] is None
    assert summary["eval"]["conv"]["positives"] == 0 and summary["eval"]["ctr"]["ne"] < 1.1
    assert summary["eval"]["cvr"] == {"ne": None, "auc": None, "calibration": None, "rows": 0, "positives": 0}


def test_uneven_small_eval_metrics_equal_numpy(outcomes):
    _, got, tmp = outcomes
    kind, summary = got["uneven_eval"]
    assert kind == "ok"
    preds = np.concatenate([np.load(tmp / "uneven_eval" / f"eval_predictions.rank{r}.npy") for r in range(2)])
    m = 3
    assert int(preds[:, 2 * m].sum()) == 300  # every row once: 250 on one rank, 50 on the other
    for j, task in enumerate(("ctr", "cvr", "conv")):
        keep = preds[:, 2 * m + j] > 0
        p, y = preds[keep, j].astype(np.float64), preds[keep, m + j]
        assert summary["eval"][task]["ne"] == pytest.approx(normalized_entropy(p, y), rel=1e-4)
        assert summary["eval"][task]["auc"] == pytest.approx(auc(p, y), abs=1e-6)


def test_sgd_checkpoints_resume(outcomes):
    _, got, _ = outcomes
    assert got["sgd"][0] == "ok" and got["sgd_resumed"][0] == "ok"
    assert got["sgd_resumed"][1]["steps"] == 12


def test_a_run_stopped_after_its_final_checkpoint_completes(outcomes):
    _, got, tmp = outcomes
    kind, summary = got["completes"]
    assert kind == "ok" and summary["steps"] == 12
    # nothing trained in this attempt: the summary's counters are the run's, as its last checkpoint kept them
    assert summary["train_reader"] == got["sgd_resumed"][1]["train_reader"] and summary["train_reader"]["rows"] > 0
    assert summary["eval"] == got["sgd_resumed"][1]["eval"]  # the same model, evaluated again
    assert (tmp / "sgd" / "summary.json").exists()


def test_a_restart_of_a_finished_job_keeps_its_summary(outcomes):
    _, got, _ = outcomes
    kind, summary = got["finished_restart"]
    assert kind == "ok" and summary == got["completes"][1]


def test_keep_last_checkpoints(outcomes):
    _, got, tmp = outcomes
    assert got["keep"][0] == "ok"
    kept = sorted(p.name for p in (tmp / "keep" / "checkpoints").glob("step-*"))
    assert kept == ["step-000000006", "step-000000008"]
    assert (tmp / "keep" / "checkpoints" / "latest").read_text() == "step-000000008"
    assert json.loads((tmp / "keep" / "run.json").read_text())["world_size"] == 2
