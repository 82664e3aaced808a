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
    assert sum(r["optimizer"] for r in report.per_rank) == 26 * 2_000_000 * 4  # one float per row
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


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [8, 128])  # 64 and 1024 ranks
def test_plan_at_scale(nodes):
    report = simulate(load_config(H100), nodes, 8, 80)
    _check(report, nodes * 8, 80)
    assert report.per_rank[report.largest]["tables"] < TABLE_BYTES / 32  # spread over many ranks
