"""The host step timed right after a training step (cold) and right after itself (hot), on
2 gloo ranks, alternating:  .venv/bin/python docs/results/cost/scripts/host_step_in_training.py
(combine_grads here has no DDP carrier, so it waits on an all-reduce of its own: not comparable)"""
import sys, itertools, time, statistics; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))
from tests.dist_utils import run_ranks
def work(_):
    import torch
    from launch.config import load_config
    from trainer.build import init_distributed
    from trainer.tools.bench import build_variant, random_batches, pin_cpu
    from balancing.multibalance import MultiBalance, MultiBalanceConfig
    cfg = load_config("launch/configs/demo.toml", [])
    env = init_distributed(); pin_cpu(env)
    it = itertools.cycle(random_batches(cfg, 8, seed=env.rank))
    p, _ = build_variant("equal", cfg, env)
    for _ in range(20): p.progress(it)
    mb = MultiBalance(3, MultiBalanceConfig())
    g = torch.randn(3, 12); g = g @ g.T
    grads = torch.randn(3, 512, 16)
    cold, hot, coldc, hotc = [], [], [], []
    for _ in range(200):
        p.progress(it)
        t = time.perf_counter(); mb._step(g, 0.5, 3.0); cold.append(time.perf_counter() - t)
        t = time.perf_counter(); mb._step(g, 0.5, 3.0); hot.append(time.perf_counter() - t)
        p.progress(it)
        t = time.perf_counter(); mb.combine_grads(grads); coldc.append(time.perf_counter() - t)
        t = time.perf_counter(); mb.combine_grads(grads); hotc.append(time.perf_counter() - t)
    m = lambda x: round(statistics.median(x) * 1e6, 1)
    return {"_step cold": m(cold), "_step hot": m(hot), "combine_grads cold": m(coldc), "combine_grads hot": m(hotc)}
if __name__ == "__main__":
    print(run_ranks(work, (0,), world=2))
