"""`mbrec plan`: the trainer's planner on simulated GPU topologies, on CPU."""
import pytest

from launch.config import load_config
from trainer.errors import RunError
from trainer.tools.plan import GIB, format_report, simulate

H100 = "launch/configs/h100.toml"  # 26 tables x 2M rows x 128, fp32, rowwise Adagrad
TABLE_BYTES = 26 * 2_000_000 * 128 * 4


def _check(report, world: int, hbm_gb: float) -> None:
    assert report.world_size == world and len(report.per_rank) == world
    assert len(report.tables) == 26
    # every row of every table is placed exactly once (no table is data-parallel here)
    assert sum(r["tables"] for r in report.per_rank) == TABLE_BYTES
    # rowwise Adagrad: one float per row of each shard (a table split into k column shards: k per row)
    per_row = sum(r["optimizer"] for r in report.per_rank) / (26 * 2_000_000 * 4)
    assert per_row == 1 or ("column_wise" in {t["sharding_type"] for t in report.tables} and per_row == int(per_row))
    assert 0 < report.per_rank[report.largest]["total"] <= hbm_gb * GIB


def test_plan_one_node_of_8():
    report = simulate(load_config(H100), 1, 8, 80)
    _check(report, 8, 80)
    assert {t["sharding_type"] for t in report.tables} <= {"table_wise", "row_wise", "table_row_wise", "column_wise"}
    text = format_report(report, 1, 8)
    assert "rank 0" in text and "t_s25" in text and "(largest)" in text


def test_plan_refuses_a_model_that_does_not_fit():
    with pytest.raises(RunError, match="does not fit on 1 x 1 GPUs of 8 GB"):
        simulate(load_config(H100), 1, 1, 8)
    # 26.6 GB of tables, optimizer and dense state, 1.1 GiB of activations: 28 GB would fit in
    # 28 GiB (30 GB), not in 28 GB less the reserve for CUDA, NCCL and fbgemm
    with pytest.raises(RunError, match=r"does not fit on 1 x 1 GPUs of 30 GB: .* 23.9 GiB usable \(less 4 GiB"):
        simulate(load_config(H100), 1, 1, 30)


def test_gigabytes_are_the_hardware_s_and_a_reserve_is_kept():
    report = simulate(load_config(H100), 1, 8, 80)
    assert report.hbm_bytes == 80 * 10**9 - 4 * 2**30
    assert "70.5 GiB usable HBM each (less 4 GiB" in format_report(report, 1, 8)


def test_fewer_tables_than_gpus_leave_no_gpu_idle():
    report = simulate(load_config(H100), 4, 8, 80)  # 26 tables, 32 GPUs
    _check(report, 32, 80)
    assert report.idle == 0 and report.imbalance < 1.1  # torchrec's own choice: 6 idle, 1.23
    assert {t["sharding_type"] for t in report.tables} == {"column_wise"}
    assert "ranks without a table: 0" in format_report(report, 4, 8)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [8, 128])  # 64 and 1024 ranks
def test_plan_at_scale(nodes):
    report = simulate(load_config(H100), nodes, 8, 80)
    _check(report, nodes * 8, 80)
    assert report.per_rank[report.largest]["tables"] < TABLE_BYTES / 32  # spread over many ranks
