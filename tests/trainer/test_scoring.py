"""Scoring and serving, from one 2-rank training run. Batch scoring (trainer.serving.predict) on 2 gloo
ranks: row for row the trainer's own eval predictions of the same checkpoint, with or without
label columns; bad rows fail as in training; a missing checkpoint, another config's checkpoint
and an unusable --out are named. The exported artifact (trainer.serving.export), scored by the
documented snippet in a fresh process without mbrec: fp32 equal to the trainer's predictions,
int8 within the stated AUC and NE tolerances."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("ctr", "cvr", "conv")


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as e:  # what the scenario is about
        return type(e).__name__, str(e)


def _bad_row(raw: dict, root: str, inputs: dict):
    """Alone, on one rank: a rank that meets a bad row stops, and the others' next collective fails."""
    from trainer.serving.predict import predict
    return _outcome(predict, from_dict(RunConfig, raw), raw["trainer"]["out_dir"], [inputs["bad_row"]],
                    f"{root}/bad_row")


def _scenarios(raw: dict, root: str, inputs: dict):
    from trainer.loop import train
    from trainer.serving.predict import predict
    train(from_dict(RunConfig, raw))
    cfg = from_dict(RunConfig, raw)
    run = raw["trainer"]["out_dir"]
    out = {"same": _outcome(predict, cfg, run, raw["data"]["eval"], f"{root}/scores", ["user_id", "item_id"]),
           "unlabelled": _outcome(predict, cfg, f"{run}/checkpoints", [inputs["unlabelled"]], f"{root}/unlabelled"),
           "again": _outcome(predict, cfg, run, raw["data"]["eval"], f"{root}/scores"),
           "no_checkpoint": _outcome(predict, cfg, f"{root}/nothing", raw["data"]["eval"], f"{root}/x"),
           "unwritable": _outcome(predict, cfg, run, raw["data"]["eval"], inputs["blocked"] + "/scores"),
           "missing_keep": _outcome(predict, cfg, run, raw["data"]["eval"], f"{root}/y", ["no_such_column"]),
           "empty": _outcome(predict, cfg, run, [inputs["empty"]], f"{root}/e")}
    grouped = apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir={root}/grouped", "trainer.max_steps=4",
                                                   f"data.eval=['{inputs['uneven']}']", "data.eval_group=user_id"])
    out["grouped"] = _outcome(train, from_dict(RunConfig, grouped))
    other = from_dict(RunConfig, apply_overrides(copy.deepcopy(raw), ["model.embedding_dim=4"]))
    out["other_config"] = _outcome(predict, other, run, raw["data"]["eval"], f"{root}/z")
    return out


@pytest.fixture(scope="module")
def scored(tiny_synth, tmp_path_factory):
    from tests.conftest import tiny_config
    root = tmp_path_factory.mktemp("predict")
    raw = tiny_config.__wrapped__(tiny_synth, root)
    raw["trainer"].update(max_steps=8, log_every=0, save_predictions=True)
    ev = pq.read_table(raw["data"]["eval"][0] if raw["data"]["eval"][0].endswith(".parquet")
                       else next(Path(raw["data"]["eval"][0]).glob("*.parquet")))
    unlabelled = root / "unlabelled.parquet"
    pq.write_table(ev.drop_columns(list(TASKS)), unlabelled, row_group_size=1500)
    d1 = ev.column("d1").to_pylist()
    d1[1234] = float("inf")
    bad = root / "bad.parquet"
    pq.write_table(ev.set_column(ev.schema.get_field_index("d1"), "d1", pa.array(d1)), bad, row_group_size=1000)
    blocked = root / "blocked"
    blocked.write_text("a file where the output directory should be")
    uneven = root / "uneven.parquet"  # row groups of 300, 250, 150: 450 rows on rank 0, 250 on rank 1
    with pq.ParquetWriter(uneven, ev.schema) as w:
        for a, b in ((0, 300), (300, 550), (550, 700)):
            w.write_table(ev.slice(a, b - a), row_group_size=b - a)
    empty = root / "empty.parquet"
    pq.write_table(ev.slice(0, 0), empty)
    inputs = {"unlabelled": str(unlabelled), "bad_row": str(bad), "blocked": str(blocked), "uneven": str(uneven),
              "empty": str(empty)}
    results = run_ranks(_scenarios, (raw, str(root), inputs))
    for name in results[0]:  # both ranks end the same way
        assert results[0][name][0] == results[1][name][0], (name, results[0][name], results[1][name])
    results[0]["bad_row"] = run_ranks(_bad_row, (raw, str(root), inputs), world=1)[0]
    return root, raw, results[0], ev


def _parts(folder: Path):
    return [pq.read_table(folder / f"part-{r:05d}.parquet") for r in range(2)]


def test_predict_equals_the_trainers_eval_predictions_row_for_row(scored):
    root, raw, res, ev = scored
    kind, summary = res["same"]
    assert kind == "ok", summary
    assert summary["rows"] == ev.num_rows and sum(summary["rows_per_rank"]) == ev.num_rows
    assert summary["step"] == 8 and summary["rows_per_s"] > 0
    parts = _parts(root / "scores")
    for r, part in enumerate(parts):
        evald = np.load(Path(raw["trainer"]["out_dir"]) / f"eval_predictions.rank{r}.npy")[:part.num_rows]
        got = np.stack([part.column(f"pred_{t}").to_numpy() for t in TASKS], 1)
        np.testing.assert_allclose(got, evald[:, :3], rtol=0, atol=1e-6)
        assert part.column_names == ["user_id", "item_id", *(f"pred_{t}" for t in TASKS)]
    # the documented order: part R holds row groups R, R + 2, ... of the file (1500 rows each)
    groups = [ev.slice(g * 1500, 1500) for g in range(ev.num_rows // 1500)]
    for r, part in enumerate(parts):
        mine = pa.concat_tables(groups[r::2])
        assert part.column("user_id").equals(mine.column("user_id"))
        assert part.column("item_id").equals(mine.column("item_id"))


def test_scoring_data_without_labels_scores_the_same(scored):
    root, _, res, _ = scored
    assert res["unlabelled"][0] == "ok", res["unlabelled"]
    assert res["unlabelled"][1]["unlabelled_tasks"] == list(TASKS)
    for a, b in zip(_parts(root / "scores"), _parts(root / "unlabelled")):
        for t in TASKS:
            assert pc.all(pc.equal(a.column(f"pred_{t}"), b.column(f"pred_{t}"))).as_py()


@pytest.mark.parametrize("name,kind,match", [
    ("again", "RunError", "already holds scoring output"),
    ("bad_row", "DataError", r"bad.parquet: dense column 'd1' has value inf \(row 234 of row group 1\)"),
    ("no_checkpoint", "RunError", "--from '.*nothing': no complete checkpoint there"),
    ("empty", "DataError", r"--data .*empty.parquet: no rows to score \(1 file\(s\), \d+ row group\(s\)\); nothing written"),
    ("unwritable", "RunError", "blocked/scores is not writable"),
    ("missing_keep", "DataError", "--keep column\\(s\\) 'no_such_column' not in the file"),
    ("other_config", "RunError", r"(?s)was trained with another model than this config \(\d+ difference\(s\) below\)"
                                 r".*\n  - model 'embedding_dim': 8 in the parent, 4 here"),
])
def test_bad_inputs_are_named(scored, name, kind, match):
    import re
    got = scored[2][name]
    assert got[0] == kind and re.search(match, got[1]), got


def test_the_cli_names_a_missing_checkpoint_first(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.cli", "predict", "launch/configs/demo.toml", "--from",
                        str(tmp_path / "nothing"), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    first = r.stderr.strip().splitlines()[0]
    assert "ERROR" in first and "no complete checkpoint there" in first, r.stderr[-2000:]


def _eval_in_file_order(run: Path, groups: int = 4, size: int = 1500) -> np.ndarray:
    """The trainer's eval predictions [rows, 3M] in the eval file's row order (rank r read row
    groups r, r + 2, ...)."""
    per_rank = [np.load(run / f"eval_predictions.rank{r}.npy") for r in range(2)]
    out = []
    for g in range(groups):
        r, k = g % 2, g // 2
        out.append(per_rank[r][k * size:(k + 1) * size])
    return np.concatenate(out)


def _serve(artifact: Path, rows: str, tmp: Path) -> tuple:
    """The documented snippet in a fresh process: no mbrec module loaded."""
    out = tmp / f"{artifact.name}.npy"
    r = subprocess.run([sys.executable, str(ROOT / "docs/examples/serve_exported.py"), str(artifact), rows,
                        "--out", str(out)], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return np.load(out), report


def _auc(p, y, w):
    from tests.trainer.test_distributed_training import auc
    keep = w > 0
    return auc(p[keep], y[keep])


def test_exported_artifact_scores_as_the_trainer_without_mbrec(scored, tmp_path):
    from launch.report import normalized_entropy
    from trainer.serving.export import export
    root, raw, _, ev = scored
    run = Path(raw["trainer"]["out_dir"])
    want = _eval_in_file_order(run)
    rows = raw["data"]["eval"][0] + "/part-00000.parquet"
    m = len(TASKS)
    measured = {}
    for layout, dtype in (("single", "fp32"), ("single", "int8"), ("sharded", "fp32"), ("sharded", "int8")):
        artifact = tmp_path / f"{layout}-{dtype}"
        manifest = export(str(run), str(artifact), dtype, layout)
        assert manifest["step"] == 8 and manifest["embedding_dtype"] == dtype and manifest["layout"] == layout
        got, report = _serve(artifact, rows, tmp_path)
        assert report["mbrec_modules_loaded"] == [] and report["rows"] == ev.num_rows
        if dtype == "fp32":
            np.testing.assert_allclose(got, want[:, :m], rtol=0, atol=1e-5)
            continue
        for j, t in enumerate(TASKS):
            y, w = want[:, m + j], want[:, 2 * m + j]
            keep = w > 0
            auc_a, auc_b = _auc(want[:, j], y, w), _auc(got[:, j], y, w)
            ne_a = normalized_entropy(want[keep, j], y[keep])
            ne_b = normalized_entropy(got[keep, j], y[keep])
            measured[layout, t] = (auc_b - auc_a, (ne_b - ne_a) / ne_a)
            assert abs(auc_b - auc_a) < 0.002 and abs(ne_b - ne_a) / ne_a < 0.002, (t, measured[layout, t])
    print("int8 vs fp32 (AUC difference, relative NE difference):", measured)


def test_export_refuses_what_it_cannot_do(scored, tmp_path):
    from trainer.errors import RunError
    from trainer.serving.export import export
    root, raw, _, _ = scored
    with pytest.raises(RunError, match="no complete checkpoint there"):
        export(str(tmp_path / "nothing"), str(tmp_path / "a"))
    export(raw["trainer"]["out_dir"], str(tmp_path / "b"), "fp32")
    with pytest.raises(RunError, match="already holds an export"):
        export(raw["trainer"]["out_dir"], str(tmp_path / "b"), "fp32", "sharded")
    with pytest.raises(RunError, match="--layout must be one of"):
        export(raw["trainer"]["out_dir"], str(tmp_path / "c"), "fp32", "pieces")


def test_grouped_auc_and_calibration_equal_numpy_on_uneven_ranks(scored):
    from tests.trainer.test_distributed_training import auc
    root, _, res, _ = scored
    kind, summary = res["grouped"]
    assert kind == "ok", summary
    preds = [np.load(root / "grouped" / f"eval_predictions.rank{r}.npy") for r in range(2)]
    groups = [np.load(root / "grouped" / f"eval_groups.rank{r}.npy") for r in range(2)]
    assert [len(p) for p in preds] != [len(preds[0])] * 2  # uneven (padding rows included)
    p, g = np.concatenate(preds), np.concatenate(groups)
    m = len(TASKS)
    for j, t in enumerate(TASKS):
        y, w = p[:, m + j], p[:, 2 * m + j]
        keep = w > 0
        got = summary["eval"][t]
        assert got["calibration"] == pytest.approx(p[keep, j].sum() / y[keep].sum(), rel=1e-5)
        total = rows = used = skipped = 0
        for k in np.unique(g[keep]):  # every group's own AUC, the plain way
            sel = keep & (g == k)
            if len(set(y[sel])) < 2:
                skipped += 1
                continue
            total += auc(p[sel, j], y[sel]) * sel.sum()
            rows += sel.sum()
            used += 1
        assert got["gauc_groups"] == used and got["gauc_groups_skipped"] == skipped and used > 10
        assert got["gauc"] == pytest.approx(total / rows, abs=1e-9)
