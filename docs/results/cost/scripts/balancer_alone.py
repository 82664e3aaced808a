import torch, time, sys
from balancing.multibalance import MultiBalance, MultiBalanceConfig
from balancing import base
from balancing.base import fan_out
torch.set_num_threads(1)
def bench(f, n=3000):
    for _ in range(200): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e6
B,n=512,16
for M in (3,12):
    mb = MultiBalance(M, MultiBalanceConfig())
    grads = torch.randn(M,B,n); h = torch.randn(B,n, requires_grad=True)
    def fb():
        torch.autograd.backward([fan_out(h, mb)],[grads])
    def eq():
        torch.autograd.backward([h.expand(M,B,n)],[grads])
    a, b = bench(fb), bench(eq)
    base.profile_scopes("timer"); base.SCOPE_TIMES.clear()
    N=3000
    for _ in range(N): fb()
    base.profile_scopes(None)
    print(f"M={M} fan_out fwd+bwd {a:.1f} expand fwd+bwd {b:.1f} diff {a-b:.1f}", {k: round(v[0]/N*1e6,1) for k, v in base.SCOPE_TIMES.items()})
