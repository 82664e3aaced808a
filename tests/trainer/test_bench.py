"""The throughput benchmark runs every variant through DMP + the pipeline on 2 gloo ranks."""
import copy

import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks


def _bench(raw):
    import torch

    from trainer.tools.bench import BenchConfig, format_table, run_bench
    from trainer.tools.breakdown import format_breakdown, run_breakdown
    from trainer.build import init_distributed
    env = init_distributed()
    variants = ["equal", "multibalance_exact", "multibalance_deferred", "multibalance_paper", "param_mgda", "dlrm_dcn"]
    result = run_bench(from_dict(RunConfig, raw), BenchConfig(variants, rounds=2, steps=3, warmup_steps=2), env)
    parquet = run_bench(from_dict(RunConfig, raw), BenchConfig(variants=["equal"], rounds=1, steps=30,
                                                                 warmup_steps=2, parquet=True), env)
    breakdown = run_breakdown(from_dict(RunConfig, raw), ["equal", "multibalance"], steps=3, warmup=2, env=env)
    import trainer.tools.bench as tb
    built, build = [], tb.build_variant
    tb.build_variant = lambda v, c, e: (built.append(v), build(v, c, e))[1]  # counts the builds
    try:  # the A/A control, its variants built twice over the rounds
        again = run_bench(from_dict(RunConfig, raw), BenchConfig(["equal", "equal_again"], rounds=4, steps=1,
                                                                 warmup_steps=1, rebuilds=2), env)
    finally:
        tb.build_variant = build
    return (result, format_table(result), parquet, breakdown, format_breakdown(breakdown), torch.get_num_threads(),
            (again, format_table(again), built))


def test_bench_all_variants_two_ranks(tiny_config):
    raw = apply_overrides(copy.deepcopy(tiny_config), ["model.dense_arch=[16, 8]", "model.embedding_dim=8"])
    r0, r1 = run_ranks(_bench, (raw,))
    result, table, parquet, breakdown, breakdown_table, threads, (again, again_table, built) = r0
    assert set(result["variants"]) == {"equal", "multibalance_exact", "multibalance_deferred", "multibalance_paper",
                                       "param_mgda", "dlrm_dcn"}
    for v, r in result["variants"].items():
        assert len(r["rounds"]) == 2 and r["best"] >= r["median"] > 0, v
        assert set(r["measures"]) == {"wall", "step", "cpu"}, v
    assert result["variants"]["equal"]["ratio_best"] == result["variants"]["equal"]["ratio_paired"] == 1.0
    r = result["variants"]["multibalance_deferred"]
    (v0, v1), (b0, b1) = r["rounds"], result["variants"]["equal"]["rounds"]
    assert r["ratio_paired"] == pytest.approx((v0 / b0 + v1 / b1) / 2)  # the median of two same-round ratios
    assert "dlrm_dcn" in table and result["world_size"] == 2
    # each rank pinned to a core of its own (2 ranks, this machine's cores shared out), one thread each
    assert r0[0]["pinned_cores"] != r1[0]["pinned_cores"] or not r0[0]["pinned_cores"]
    assert threads == max(len(r0[0]["pinned_cores"]), 1) or not r0[0]["pinned_cores"]
    # Parquet input: more steps than one epoch has (12000 rows / 2 ranks / 256 = 24): it wraps
    assert parquet["input"] == "parquet" and parquet["variants"]["equal"]["best"] > 0
    # the breakdown: rows add up to the profiled step; the balancer's ranges only where it runs
    for v, b in breakdown.items():
        assert abs(b["check_us"]) < 1e-6 * b["profiled_step_us"] + 1e-3, v
        assert b["rows"]["pipeline backward"]["ops"] > 0 and b["step_us"] > 0, v
    mb, eq = breakdown["multibalance"], breakdown["equal"]
    assert {"balancer host_step", "balancer local_gram", "balancer combine"} <= set(mb["rows"])
    assert not any(k.startswith("balancer") for k in eq["rows"]) and not eq["timers_us"]
    assert mb["timers_us"]["fan_out_backward"] >= mb["timers_us"]["host_step"] > 0  # inclusive
    assert "balancer ranges, timers" in breakdown_table
    # rebuilds: each variant built again half way; the A/A pair timed in every round
    assert sorted(built) == ["equal", "equal", "equal_again", "equal_again"]
    assert len(again["variants"]["equal_again"]["rounds"]) == 4 and again["rebuilds"] == 2
    assert "variants built 2 times" in again_table


def test_paired_ratio_and_the_rounds_an_interval_needs():
    import math

    from trainer.tools.bench import paired_ratio
    base = [100.0] * 9
    x = paired_ratio([99.0, 98.0, 100.0, 97.0, 99.0, 101.0, 99.0, 96.0, 102.0], base)
    assert x["ratio"] == 0.99 and x["ci95"] == [0.96, 1.02]  # n = 9: k = 1, the extremes
    logs = sorted(math.log(v / 100) for v in [99.0, 98.0, 100.0, 97.0, 99.0, 101.0, 99.0, 96.0, 102.0])
    mad = sorted(abs(v - logs[4]) for v in logs)[4]
    assert x["rounds_for_1pct"] == math.ceil((1.96 * 1.2533 * 1.4826 * mad / 0.01) ** 2)
    assert paired_ratio([5.0] * 9, [5.0] * 9)["rounds_for_1pct"] == 8  # no spread: the fewest with an interval


def test_no_pinning_with_more_ranks_than_cores():
    import os

    import torch

    from trainer.tools.bench import pin_cpu
    from trainer.build import DistEnv
    before = os.sched_getaffinity(0)
    crowded = DistEnv(rank=0, world_size=64, local_rank=0, local_world_size=len(before) + 1, device=torch.device("cpu"))
    assert pin_cpu(crowded) == [] and os.sched_getaffinity(0) == before
    assert pin_cpu(DistEnv(0, 1, 0, 1, torch.device("meta"))) == []  # not a CPU: nothing pinned


def test_median_ci95_uses_the_binomial_order_statistics():
    from trainer.tools.bench import median_ci95
    assert median_ci95([1.0, 2, 3, 4, 5]) is None  # 5 values: no order statistics reach 95 %
    assert median_ci95([]) is None and median_ci95([float(i) for i in range(7)]) is None
    # n = 30: k = floor((30 - 1.96 sqrt(30)) / 2) = 9 -> the 9th and 22nd smallest
    values = [float(i) for i in range(1, 31)]
    assert median_ci95(values) == [9.0, 22.0]
    # n = 6: k = floor((6 - 4.80) / 2) = 0 -> None; n = 8: k = floor((8 - 5.54) / 2) = 1 -> min, max
    assert median_ci95([float(i) for i in range(6)]) is None
    assert median_ci95([float(i) for i in range(8)]) == [0.0, 7.0]


def test_variants_stay_resident_only_when_they_fit():
    from trainer.tools.bench import fits_resident
    gib = 2**30
    assert fits_resident(30 * gib, 75 * gib, 2)  # two h100.toml-sized variants on an 80 GB GPU
    assert not fits_resident(30 * gib, 75 * gib, 4)  # four do not: built one at a time
    assert fits_resident(10**9, 0, 1)  # a single variant never needs room for others


def test_rounds_and_steps_follow_the_mode_unless_given():
    from trainer.tools.bench import BenchConfig, resolve_counts
    resident, rebuilt, given, gpu = BenchConfig(), BenchConfig(one_at_a_time=True), BenchConfig(rounds=7, steps=3), \
        BenchConfig()
    for b in (resident, rebuilt, given):
        resolve_counts(b)
    resolve_counts(gpu, "cuda")
    assert (resident.rounds, resident.steps) == (200, 2) and (rebuilt.rounds, rebuilt.steps) == (5, 50)
    assert (given.rounds, given.steps) == (7, 3) and (gpu.rounds, gpu.steps) == (30, 20)


def test_rebuilds_are_spread_over_the_rounds_and_checked():
    from trainer.tools.bench import BenchConfig, rebuild_every
    assert rebuild_every(BenchConfig(rounds=3000, rebuilds=10)) == 300
    assert rebuild_every(BenchConfig(rounds=5, rebuilds=1)) == 0  # built once
    for bad in (0, 6):  # none, or more builds than rounds (which would silently build once)
        with pytest.raises(ValueError, match="rebuilds must be between 1 and the rounds"):
            rebuild_every(BenchConfig(rounds=5, rebuilds=bad))
