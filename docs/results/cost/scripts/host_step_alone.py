"""MultiBalance's host step, combine_grads and the fan-out timed alone (one process, a loop):
    .venv/bin/python docs/results/cost/scripts/host_step_alone.py   (from the repository root)"""
import torch, time, sys
from balancing.multibalance import MultiBalance, MultiBalanceConfig
from balancing.base import fan_out
def bench(f, n=3000):
    for _ in range(100): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e6
B,n=512,16
for M in (3,12):
    mb = MultiBalance(M, MultiBalanceConfig())
    g = torch.randn(M,M*4); g = g@g.T
    grads = torch.randn(M,B,n); h = torch.randn(B,n, requires_grad=True)
    def fb():
        torch.autograd.backward([fan_out(h, mb)],[grads])
    def eq():
        torch.autograd.backward([h.expand(M,B,n)],[grads])
    print(f"M={M} _step {bench(lambda: mb._step(g, 0.5, 3.0)):.1f} combine_grads {bench(lambda: mb.combine_grads(grads)):.1f} fan_out fwd+bwd {bench(fb):.1f} expand fwd+bwd {bench(eq):.1f}")
