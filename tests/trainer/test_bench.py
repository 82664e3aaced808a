"""The throughput benchmark runs every variant through DMP + the pipeline on 2 gloo ranks."""
import copy

import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks


def _bench(raw):
    from trainer.bench import BenchConfig, format_table, run_bench
    from trainer.build import init_distributed
    env = init_distributed()
    variants = ["equal", "multibalance_exact", "multibalance_deferred", "param_mgda", "dlrm_dcn"]
    result = run_bench(from_dict(RunConfig, raw), BenchConfig(variants, rounds=2, steps=3, warmup_steps=2), env)
    parquet = run_bench(from_dict(RunConfig, raw), BenchConfig(variants=["equal"], rounds=1, steps=30,
                                                                 warmup_steps=2, parquet=True), env)
    return result, format_table(result), parquet


def test_bench_all_variants_two_ranks(tiny_config):
    raw = apply_overrides(copy.deepcopy(tiny_config), ["model.dense_arch=[16, 8]", "model.embedding_dim=8"])
    (result, table, parquet), _ = run_ranks(_bench, (raw,))
    assert set(result["variants"]) == {"equal", "multibalance_exact", "multibalance_deferred", "param_mgda",
                                       "dlrm_dcn"}
    for v, r in result["variants"].items():
        assert len(r["rounds"]) == 2 and r["best"] >= r["median"] > 0, v
    assert result["variants"]["equal"]["ratio_best"] == result["variants"]["equal"]["ratio_paired"] == 1.0
    r = result["variants"]["multibalance_deferred"]
    (v0, v1), (b0, b1) = r["rounds"], result["variants"]["equal"]["rounds"]
    assert r["ratio_paired"] == pytest.approx((v0 / b0 + v1 / b1) / 2)  # the median of two same-round ratios
    assert "dlrm_dcn" in table and result["world_size"] == 2
    # Parquet input: more steps than one epoch has (12000 rows / 2 ranks / 256 = 24): it wraps
    assert parquet["input"] == "parquet" and parquet["variants"]["equal"]["best"] > 0
