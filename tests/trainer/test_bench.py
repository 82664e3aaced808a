"""The throughput benchmark runs every variant through DMP + the pipeline on 2 gloo ranks."""
import copy

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks


def _bench(raw):
    from trainer.bench import BenchConfig, format_table, run_bench
    from trainer.build import init_distributed
    env = init_distributed()
    result = run_bench(from_dict(RunConfig, raw), BenchConfig(rounds=2, steps=3, warmup_steps=2), env)
    parquet = run_bench(from_dict(RunConfig, raw), BenchConfig(variants=["equal"], rounds=1, steps=30,
                                                                 warmup_steps=2, parquet=True), env)
    return result, format_table(result), parquet


def test_bench_all_variants_two_ranks(tiny_config):
    raw = apply_overrides(copy.deepcopy(tiny_config), ["model.dense_arch=[16, 8]", "model.embedding_dim=8"])
    (result, table, parquet), _ = run_ranks(_bench, (raw,))
    assert set(result["variants"]) == {"equal", "multibalance", "param_mgda", "dlrm_dcn"}
    for v, r in result["variants"].items():
        assert len(r["rounds"]) == 2 and r["best"] >= r["median"] > 0, v
    assert result["variants"]["equal"]["ratio_best"] == 1.0
    assert "dlrm_dcn" in table and result["world_size"] == 2
    # Parquet input: more steps than one epoch has (12000 rows / 2 ranks / 256 = 24): it wraps
    assert parquet["input"] == "parquet" and parquet["variants"]["equal"]["best"] > 0
