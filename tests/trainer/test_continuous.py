"""Continuous training (trainer.start): warm starts from a parent onto new files on 1 and 2
ranks, resumes on another world size, and the state that must survive the reshard, compared
element-wise (the parent's final checkpoint against the child's state right after loading,
both read back whole with DCP's own converter); refusals name what does not fit."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from data.synth import SynthConfig, data_section, write_dataset
from launch.config import RunConfig, apply_overrides, from_dict
from launch.report import normalized_entropy
from tests.dist_utils import run_ranks

PARENT_STEPS = 12


def _cfg(raw, *overrides):
    return from_dict(RunConfig, apply_overrides(copy.deepcopy(raw), list(overrides)))


def _train(raw, *overrides):
    from trainer.loop import train
    return train(_cfg(raw, *overrides))


def _outcome(raw, *overrides):
    """A run that should fail: (error class, message)."""
    try:
        _train(raw, *overrides)
    except Exception as e:  # what the scenario is about
        return type(e).__name__, str(e)
    return "ok", ""


def _loaded_state(raw, dump: str, *overrides):
    """Builds and starts a run as training would (its checkpoint or parent loaded), then saves
    the state as it is before the first step to `dump`."""
    from trainer.build import init_distributed
    from trainer.checkpoint import CheckpointDir
    from trainer.loop import _prepare
    cfg = _cfg(raw, *overrides)
    run = _prepare(cfg, init_distributed(cfg.trainer.pg_timeout_s, "cpu"))
    CheckpointDir(dump).save(run.dmp, run.optimizer, run.step)
    return {**run.start, "lrs": sorted({g["lr"] for g in run.optimizer.param_groups})}


def _whole(ckpt: str, tmp: Path) -> dict:
    """A DCP checkpoint as whole tensors, flattened keys (DCP's own converter, one process)."""
    out = tmp / (str(Path(ckpt).relative_to(tmp)).replace("/", "_") + ".pt")
    dcp_to_torch_save(ckpt, out)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v
    walk(torch.load(out, weights_only=False))
    return flat


def _parents(raw, root):
    """2 ranks: the parent (table-wise), a column-wise parent, and a run stopped mid-epoch."""
    _train(raw, f"trainer.out_dir={root}/parent", f"trainer.max_steps={PARENT_STEPS}", "trainer.checkpoint_every=6",
           "trainer.keep_checkpoints=0")
    _train(raw, f"trainer.out_dir={root}/parent_cw", "trainer.max_steps=6", "trainer.sharding_types=['column_wise']")
    stopped = _train(raw, f"trainer.out_dir={root}/stopped", "trainer.max_steps=7")
    return stopped


def _one_rank(raw, root, day2):
    """1 rank: warm starts from the 2-rank parents, refusals, the stopped run resumed, a 1-rank parent."""
    new = [f"data.train={json.dumps(day2['train'])}", f"data.eval={json.dumps(day2['eval'])}"]
    res = {"state": _loaded_state(raw, f"{root}/dump_2to1", f"trainer.out_dir={root}/child1_probe",
                                  f"trainer.init_from={root}/parent", *new, "data.batch_size=128",
                                  "optim.dense_lr=0.001", "optim.sparse_lr=0.01")}
    res["child"] = _train(raw, f"trainer.out_dir={root}/child1", f"trainer.init_from={root}/parent", *new,
                          "trainer.max_steps=6", "trainer.save_predictions=true", "optim.dense_lr=0.001")
    res["cw_state"] = _loaded_state(raw, f"{root}/dump_cw", f"trainer.out_dir={root}/cw_probe",
                                    f"trainer.init_from={root}/parent_cw", *new)
    for name, change in (("dim", "model.embedding_dim=4"), ("rows", "data.sparse[0].num_embeddings=4000"),
                         ("tasks", "data.tasks=[{name='ctr'}, {name='cvr'}]"), ("optim", "optim.dense=sgd"),
                         ("bad_parent", "trainer.init_from=/nonexistent/run"),
                         ("nonfinite", f"trainer.init_from={root}/corrupt/step-{PARENT_STEPS:09d}"),
                         ("edited_stats", f"trainer.init_from={root}/edited"),
                         ("flipped", f"trainer.init_from={root}/flipped")):
        overrides = [f"trainer.out_dir={root}/refused_{name}", f"trainer.init_from={root}/parent", *new,
                     "trainer.max_steps=2", change]
        if name == "rows":  # (a list element: set through the dict)
            r = copy.deepcopy(raw)
            r["data"]["sparse"][0]["num_embeddings"] = 4000
            res[name] = _outcome(r, *overrides[:-1])
        else:
            res[name] = _outcome(raw, *overrides)
    res["resume_state"] = _loaded_state(raw, f"{root}/dump_resume", f"trainer.out_dir={root}/stopped")
    res["resumed"] = _train(raw, f"trainer.out_dir={root}/stopped", "trainer.epochs=1")
    res["parent1"] = _train(raw, f"trainer.out_dir={root}/parent1", "trainer.max_steps=5")
    return res


def _two_ranks(raw, root, day2):
    new = [f"data.train={json.dumps(day2['train'])}", f"data.eval={json.dumps(day2['eval'])}"]
    a = _loaded_state(raw, f"{root}/dump_1to2", f"trainer.out_dir={root}/child2_probe",
                      f"trainer.init_from={root}/parent1/checkpoints", *new)
    b = _loaded_state(raw, f"{root}/dump_2to2_model", f"trainer.out_dir={root}/child3_probe",
                      f"trainer.init_from={root}/parent", "trainer.init_parts=['model']", *new)
    return a, b


@pytest.fixture(scope="module")
def scenarios(tiny_synth, tmp_path_factory):
    from tests.conftest import tiny_config
    root = tmp_path_factory.mktemp("continuous")
    day2 = SynthConfig(out_dir=str(root / "day2"), train_files=1, eval_files=1, rows_per_file=3_000,
                       row_group_size=1_000, cardinality=2_000, seed=11)
    write_dataset(day2)
    raw = tiny_config.__wrapped__(tiny_synth, root)
    raw["trainer"].update(log_every=0)
    stopped = run_ranks(_parents, (raw, str(root)))[0]
    # a copy of the parent's final checkpoint with one non-finite optimizer slot
    last = f"{root}/parent/checkpoints/step-{PARENT_STEPS:09d}"
    whole = torch.load(_whole_path(last, root), weights_only=False)
    whole["optim"]["state"]["model.ebc.embedding_bags.t_user_id.weight"]["t_user_id.momentum1"][7] = float("nan")
    torch.save(whole, root / "corrupt.pt")
    torch_save_to_dcp(root / "corrupt.pt", f"{root}/corrupt/step-{PARENT_STEPS:09d}")
    for name in ("run.json", "dense_stats.json"):
        shutil.copy(root / "parent" / name, root / "corrupt" / name)
    # a copy of the parent whose dense_stats.json was edited after training
    shutil.copytree(last, root / "edited" / f"step-{PARENT_STEPS:09d}")
    shutil.copy(root / "parent" / "run.json", root / "edited" / "run.json")
    stats = json.loads((root / "parent" / "dense_stats.json").read_text())
    stats["mean"][0] += 1.0
    (root / "edited" / "dense_stats.json").write_text(json.dumps(stats))
    # a copy of the parent's final checkpoint with one byte of a shard changed after the save
    shutil.copytree(last, root / "flipped" / f"step-{PARENT_STEPS:09d}")
    for name in ("run.json", "dense_stats.json"):
        shutil.copy(root / "parent" / name, root / "flipped" / name)
    shard = root / "flipped" / f"step-{PARENT_STEPS:09d}" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    one = run_ranks(_one_rank, (raw, str(root), data_section(day2)), world=1)[0]
    two = run_ranks(_two_ranks, (raw, str(root), data_section(day2)))[0]
    return root, raw, None, stopped, one, two


def _whole_path(ckpt, root) -> Path:
    out = Path(root) / "parent_final.pt"
    if not out.exists():
        dcp_to_torch_save(ckpt, out)
    return out


def _assert_equal(a: dict, b: dict, keys):
    assert keys, "nothing compared"
    for k in keys:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{k} differs after the reshard"
        else:
            assert x == y, k


def _parts(flat: dict, part: str):
    from trainer.checkpoint import part_of
    return [k for k in flat if part_of(k) == part]


@pytest.mark.parametrize("dump,parent", [("dump_2to1/step-000000000", "parent/checkpoints/step-000000012"),
                                         ("dump_1to2/step-000000000", "parent1/checkpoints/step-000000005"),
                                         ("dump_resume/step-000000007", "stopped/checkpoints/step-000000007")])
def test_loaded_state_equals_the_checkpoints_on_another_world_size(scenarios, dump, parent):
    """Warm starts 2 -> 1 and 1 -> 2 ranks, and a resume 2 -> 1: every model, optimizer and
    balancer tensor equal element-wise."""
    root = scenarios[0]
    got = _whole(str(root / dump), root)
    want = _whole(str(root / parent), root)
    for part in ("model", "optim", "balancer"):
        _assert_equal(want, got, _parts(want, part))
    momentum = [k for k in _parts(want, "optim") if k.endswith("momentum1")]
    assert len(momentum) == 6 and all(want[k].abs().sum() > 0 for k in momentum)  # real state was compared
    assert any(k.endswith("exp_avg_sq") for k in _parts(want, "optim"))  # the dense optimizer's too
    assert int(got["progress.step"]) == int(want["progress.step"]) * dump.startswith("dump_resume")
    if dump.startswith("dump_2to1"):  # the config's learning rates, not the parent's
        assert scenarios[4]["state"]["lrs"] == pytest.approx([0.001, 0.01])  # (fused: float32)


def test_init_parts_model_takes_the_weights_only(scenarios):
    root = scenarios[0]
    got = _whole(str(root / "dump_2to2_model" / "step-000000000"), root)
    want = _whole(str(root / "parent/checkpoints/step-000000012"), root)
    _assert_equal(want, got, _parts(want, "model"))
    for k in _parts(want, "optim"):
        if k.endswith("momentum1") or k.endswith("exp_avg_sq"):  # (Adam's: created at the first step)
            assert k not in got or got[k].abs().sum() == 0, f"{k} carried over"
    assert not torch.equal(got["model.balancer.weights"], want["model.balancer.weights"])
    start = scenarios[5][1]
    assert start["from"] == "parent" and start["parts"] == ["model"]


def test_warm_start_records_its_parent_and_trains_from_step_0(scenarios):
    root, raw = scenarios[0], scenarios[1]
    child = scenarios[4]["child"]
    assert child["steps"] == 6 and child["start"]["from"] == "parent"
    assert child["start"]["parent_step"] == PARENT_STEPS
    run = json.loads((root / "child1" / "run.json").read_text())
    parent = json.loads((root / "parent" / "run.json").read_text())
    from trainer.identity import digest
    assert run["parent"]["checkpoint"] == f"{root}/parent/checkpoints/step-{PARENT_STEPS:09d}"
    assert run["parent"]["step"] == PARENT_STEPS and run["parent"]["identity"] == digest(parent)
    assert run["parent"]["transforms"] == "parent"
    # the parent's dense transforms, not ones fitted on the new files
    assert json.loads((root / "child1" / "dense_stats.json").read_text()) == json.loads(
        (root / "parent" / "dense_stats.json").read_text())
    assert run["optim.dense_lr"] == 0.001 != raw["optim"]["dense_lr"]  # learning rates may change
    # metrics are this run's own: summary equals numpy on its saved predictions
    preds = np.load(root / "child1" / "eval_predictions.rank0.npy")
    m = 3
    for j, task in enumerate(("ctr", "cvr", "conv")):
        keep = preds[:, 2 * m + j] > 0
        assert abs(normalized_entropy(preds[keep, j], preds[keep, m + j]) - child["eval"][task]["ne"]) < 1e-4
    from trainer.checkpoint import read_metadata, part_of
    keys = read_metadata(f"{root}/child1/checkpoints/step-000000006")
    assert {part_of(k) for k in keys} == {"model", "balancer", "optim", "progress"}  # no metric state


@pytest.mark.parametrize("name,match", [
    ("dim", r"model 'embedding_dim': 8 in the parent, 4 here"),
    ("rows", r"table 'user_id': rows 2000 in the parent, 4000 here"),
    ("tasks", r"task 'conv' only in the parent"),
    ("optim", r"optim.dense: 'adam' in the parent, 'sgd' here .*init_parts without 'optim'"),
    ("bad_parent", r"trainer.init_from = '/nonexistent/run': no complete checkpoint there"),
    ("nonfinite", r"holds non-finite values in 1 tensor\(s\) \(below\): not training from it\n  - optim.state.model.ebc.embedding_bags.t_user_id.weight.t_user_id"
                  r".momentum1 \(1 non-finite value"),
    ("flipped", r"flipped/step-000000012: file __1_0.distcp differs from what the save wrote \(bytes \d+-\d+: their crc32 is"),
    ("edited_stats", r"dense_stats.json beside checkpoint .*edited/step-000000012 is not the one its run was trained "
                     r"with"),
])
def test_what_does_not_fit_is_refused_and_named(scenarios, name, match):
    kind, msg = scenarios[4][name]
    assert kind in ("RunError", "CheckpointError"), (kind, msg)
    import re
    assert re.search(match, msg), msg
    assert not (scenarios[0] / f"refused_{name}" / "summary.json").exists()


def test_resume_on_another_world_size_trains_every_row_of_the_epoch_once(scenarios):
    root, _, _, stopped, one, _ = scenarios
    resumed = one["resumed"]
    rs = resumed["start"]["resplit"]
    assert resumed["start"]["from"] == "resume" and resumed["world_size"] == 1 and stopped["world_size"] == 2
    assert rs["from"]["world_size"] == 2 and rs["to"]["world_size"] == 1 and rs["partial_rule"] == "reread"
    # 7 steps of 256 rows on each of 2 ranks: each rank's first unit (1500 rows) consumed, its second
    # one partly read (292 rows) and read again; the resumed rank reads every other unit once (the
    # reader counts a unit's rows when it starts it; row-level exactness: tests/data/test_position.py)
    assert rs["units_consumed"] == 2 and rs["partial_units"] == 2 and rs["units_left"] == 6
    assert rs["rows_trained_twice"] == 2 * (7 * 256 - 1500)
    # the summary counts the whole run: the rows read before the checkpoint (its units started: 4 x 1500),
    # then those read after it (the 6 units left and the 2 partly read ones again)
    assert stopped["train_reader"]["rows"] == 4 * 1500
    assert resumed["train_reader"]["rows"] == 4 * 1500 + 12_000 - 2 * 1500
    assert resumed["steps"] == 7 + 6 * 1500 // 256 + 1  # the rest of the epoch, one rank's batches
    run = json.loads((root / "stopped" / "run.json").read_text())
    assert run["world_size"] == 1


def test_column_wise_parent_reshards_onto_table_wise(scenarios):
    """Another sharding type (column-wise on 2 ranks; the CPU planner offers no row-wise
    kernel) loaded table-wise on 1 rank: the state is equal element-wise."""
    root = scenarios[0]
    got = _whole(str(root / "dump_cw" / "step-000000000"), root)
    want = _whole(str(root / "parent_cw/checkpoints/step-000000006"), root)
    for part in ("model", "optim", "balancer"):
        _assert_equal(want, got, _parts(want, part))


def test_the_cpu_planner_has_no_row_wise_kernel():
    """Why no row-wise plan is tested on CPU (tests/gpu covers the GPU planner's choice)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(num_embeddings=100, embedding_dim=8, name="t",
                                                     feature_names=["f"])], device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(Topology(world_size=2, compute_device="cpu"),
                                       constraints={"t": ParameterConstraints(sharding_types=["row_wise"])})
    with pytest.raises(Exception, match="No available sharding type"):
        planner.plan(ebc, get_default_sharders())
