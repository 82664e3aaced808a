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


def test_median_ci95_uses_the_binomial_order_statistics():
    from trainer.bench import median_ci95
    assert median_ci95([1.0, 2, 3, 4, 5]) is None  # 5 values: no order statistics reach 95 %
    assert median_ci95([]) is None and median_ci95([float(i) for i in range(7)]) is None
    # n = 30: k = floor((30 - 1.96 sqrt(30)) / 2) = 9 -> the 9th and 22nd smallest
    values = [float(i) for i in range(1, 31)]
    assert median_ci95(values) == [9.0, 22.0]
    # n = 6: k = floor((6 - 4.80) / 2) = 0 -> None; n = 8: k = floor((8 - 5.54) / 2) = 1 -> min, max
    assert median_ci95([float(i) for i in range(6)]) is None
    assert median_ci95([float(i) for i in range(8)]) == [0.0, 7.0]


def test_variants_stay_resident_only_when_they_fit():
    from trainer.bench import fits_resident
    gib = 2**30
    assert fits_resident(30 * gib, 75 * gib, 2)  # two h100.toml-sized variants on an 80 GB GPU
    assert not fits_resident(30 * gib, 75 * gib, 4)  # four do not: built one at a time
    assert fits_resident(10**9, 0, 1)  # a single variant never needs room for others
